//! The scheduler's state: every sequence, the running set (by arrival) and the waiting queue
//! (FIFO, preempted sequences at its head), the KV pool, and what the next plan must report.
//! Admission, finishing and cancelling live here; `schedule` builds a step, `complete`
//! applies its samples.

use super::blocks::BlockPool;
use super::sequence::Sequence;
use super::slots::SlotPool;
use super::{
    Counters, FinishReason, KvConfig, SLOTS_PREFIX_BLOCK, SchedConfig, SchedError, SeqRequest,
};
use std::collections::{HashMap, VecDeque};

/// The model's KV cache as the scheduler sees it.
#[derive(Clone)]
pub(super) enum Kv {
    Paged(BlockPool),
    Slots(SlotPool),
}

/// One fed chunk of the step in flight.
#[derive(Clone)]
pub(super) struct Fed {
    pub seq_id: u64,
    pub tokens: usize,
    pub sample: bool,
}

/// Continuous batching as plain data: see the module doc for the loop that drives it.
/// Cloning copies the whole state (benchmarks start each iteration from one).
#[derive(Clone)]
pub struct Policy {
    pub(super) config: SchedConfig,
    pub(super) kv: Kv,
    pub(super) seqs: HashMap<u64, Sequence>,
    /// Running sequences (they hold KV) ordered by arrival.
    pub(super) running: Vec<u64>,
    pub(super) waiting: VecDeque<u64>,
    next_arrival: u64,
    /// Plans made so far: the current one's number marks what it scheduled.
    pub(super) plans: u64,
    /// Sequences to release on the worker with the next plan.
    pub(super) release: Vec<u64>,
    pub(super) in_flight: Option<Vec<Fed>>,
    pub(super) totals: Counters,
}

impl Policy {
    pub fn new(config: SchedConfig) -> Result<Policy, SchedError> {
        config.validate()?;
        let kv = match config.kv {
            KvConfig::Paged {
                num_blocks,
                block_size,
            } => Kv::Paged(BlockPool::new(num_blocks, block_size)),
            KvConfig::Slots { num_slots, .. } => Kv::Slots(SlotPool::new(num_slots)),
        };
        Ok(Policy {
            config,
            kv,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_arrival: 0,
            plans: 0,
            release: Vec::new(),
            in_flight: None,
            totals: Counters::default(),
        })
    }

    pub fn config(&self) -> &SchedConfig {
        &self.config
    }

    /// Queues a request, or refuses one that could never run: alone in the whole KV cache
    /// (or one slot) and within the model's length, prompt + max_tokens must fit.
    pub fn add(&mut self, request: SeqRequest) -> Result<(), SchedError> {
        self.admissible(&request)?;
        if self.seqs.contains_key(&request.seq_id) {
            return Err(SchedError::DuplicateSeq(request.seq_id));
        }
        let seq = Sequence {
            id: request.seq_id,
            arrival: self.next_arrival,
            prompt_len: request.prompt.len(),
            tokens: request.prompt,
            max_tokens: request.max_tokens,
            stop_ids: request.stop_ids,
            computed: 0,
            blocks: Vec::new(),
            chain: Vec::new(),
            chain_broken: false,
            slot: None,
            copy_from: None,
            planned: 0,
            admitted: 0,
            on_worker: false,
        };
        self.next_arrival += 1;
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
        Ok(())
    }

    fn admissible(&self, request: &SeqRequest) -> Result<(), SchedError> {
        let prompt = request.prompt.len();
        let max_tokens = request.max_tokens;
        if prompt == 0 {
            return Err(SchedError::EmptyPrompt);
        }
        if max_tokens == 0 {
            return Err(SchedError::ZeroMaxTokens);
        }
        let total = prompt.saturating_add(max_tokens);
        if total > self.config.max_model_len {
            return Err(SchedError::TooLong {
                prompt,
                max_tokens,
                max_model_len: self.config.max_model_len,
            });
        }
        match self.config.kv {
            KvConfig::Paged {
                num_blocks,
                block_size,
            } if total.div_ceil(block_size) > num_blocks => Err(SchedError::ExceedsPool {
                prompt,
                max_tokens,
                needed: total.div_ceil(block_size),
                block_size,
                num_blocks,
            }),
            KvConfig::Slots { slot_tokens, .. } if total > slot_tokens => {
                Err(SchedError::ExceedsSlot {
                    prompt,
                    max_tokens,
                    slot_tokens,
                })
            }
            _ => Ok(()),
        }
    }

    /// Ends a sequence the text layer saw finish (a stop string). False if unknown (already
    /// finished or cancelled).
    pub fn finish(&mut self, seq_id: u64, _reason: FinishReason) -> bool {
        self.remove(seq_id)
    }

    /// Drops a sequence whose client went away: its KV is free for the next plan, which
    /// releases it on the worker. False if unknown.
    pub fn cancel(&mut self, seq_id: u64) -> bool {
        self.remove(seq_id)
    }

    /// Nothing waits and nothing runs (releases may still be due: `plan` reports them).
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn counters(&self) -> Counters {
        let (kv_used, kv_total) = match &self.kv {
            Kv::Paged(pool) => (pool.total() - pool.available(), pool.total()),
            Kv::Slots(pool) => (pool.total() - pool.available(), pool.total()),
        };
        Counters {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_used,
            kv_total,
            ..self.totals
        }
    }

    pub(super) fn remove(&mut self, seq_id: u64) -> bool {
        let Some(mut seq) = self.seqs.remove(&seq_id) else {
            return false;
        };
        self.running.retain(|&id| id != seq_id);
        self.waiting.retain(|&id| id != seq_id);
        let retain = self.config.prefix_caching && seq.computed >= SLOTS_PREFIX_BLOCK;
        match (&mut self.kv, seq.slot) {
            // Slots KV: a finished sequence's cells stay a prefix source until its slot is
            // needed; it is released on the worker then (or by `release_retained`).
            (Kv::Slots(pool), Some(slot)) if retain && seq.on_worker => {
                pool.retain(slot, seq_id, seq.tokens[..seq.computed].to_vec());
                return true;
            }
            _ => self.free_kv(&mut seq),
        }
        if seq.on_worker {
            self.release.push(seq_id);
        }
        true
    }

    /// Slots KV: releases every finished sequence whose slot was kept as a prefix source
    /// (with the next plan), e.g. before the model drains or unloads.
    pub fn release_retained(&mut self) {
        if let Kv::Slots(pool) = &mut self.kv {
            self.release.extend(pool.release_retained());
        }
    }

    /// Returns the sequence's KV to the pool (tail blocks first, so they are evicted first).
    pub(super) fn free_kv(&mut self, seq: &mut Sequence) {
        match &mut self.kv {
            Kv::Paged(pool) => {
                for &block in seq.blocks.iter().rev() {
                    pool.free(block);
                }
            }
            Kv::Slots(pool) => {
                if let Some(slot) = seq.slot {
                    pool.free(slot);
                }
            }
        }
        seq.forget_kv();
    }
}
