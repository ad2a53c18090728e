//! Applying a step's results: the fed tokens' KV now exists (full blocks enter the prefix
//! cache), each sample is appended, and sequences end on a stop id, `max_tokens` or the
//! model's length. Also what to do when the worker lost its KV.

use super::blocks::BlockPool;
use super::policy::{Fed, Kv, Policy};
use super::sequence::Sequence;
use super::{FinishReason, SchedError, StepOutcome};
use std::collections::HashMap;

impl Policy {
    /// Applies the step in flight with the tokens sampled for it (`(seq_id, token)`, one per
    /// sequence whose `SeqStep::sample` was true; samples of sequences cancelled meanwhile
    /// are ignored). On an error the worker broke the contract: the step is dropped without
    /// effect and the actor should treat it as a worker failure (`worker_restarted`).
    pub fn complete(&mut self, sampled: &[(u64, u32)]) -> Result<StepOutcome, SchedError> {
        let fed = self.in_flight.take().ok_or(SchedError::NoStepInFlight)?;
        let samples = self.check_samples(&fed, sampled)?;
        let mut outcome = StepOutcome::default();
        for f in &fed {
            let Some(seq) = self.seqs.get_mut(&f.seq_id) else {
                continue;
            };
            seq.computed += f.tokens;
            if let (Kv::Paged(pool), true) = (&mut self.kv, self.config.prefix_caching) {
                cache_full_blocks(pool, seq);
            }
            let Some(&token) = samples.get(&f.seq_id) else {
                continue;
            };
            seq.tokens.push(token);
            if let Some(reason) = finish_reason(seq, self.config.max_model_len) {
                outcome.finished.push((f.seq_id, reason));
                self.remove(f.seq_id);
            }
        }
        Ok(outcome)
    }

    /// The samples by sequence, if they are exactly those the step asked for.
    fn check_samples(
        &self,
        fed: &[Fed],
        sampled: &[(u64, u32)],
    ) -> Result<HashMap<u64, u32>, SchedError> {
        let wanted: HashMap<u64, bool> = fed.iter().map(|f| (f.seq_id, f.sample)).collect();
        let mut samples = HashMap::with_capacity(sampled.len());
        for &(id, token) in sampled {
            if wanted.get(&id) != Some(&true) || samples.insert(id, token).is_some() {
                return Err(SchedError::UnexpectedSample(id));
            }
        }
        let missing = fed.iter().find(|f| {
            f.sample && self.seqs.contains_key(&f.seq_id) && !samples.contains_key(&f.seq_id)
        });
        match missing {
            Some(f) => Err(SchedError::MissingSample(f.seq_id)),
            None => Ok(samples),
        }
    }

    /// The worker restarted: its KV is gone. Every sequence keeps its tokens and waits, in
    /// arrival order ahead of new requests, to be recomputed; nothing is released (the new
    /// worker knows none of them) and the prefix cache starts empty.
    pub fn worker_restarted(&mut self) {
        self.in_flight = None;
        self.release.clear();
        self.kv = match self.config.kv {
            super::KvConfig::Paged {
                num_blocks,
                block_size,
            } => Kv::Paged(BlockPool::new(num_blocks, block_size)),
            super::KvConfig::Slots { num_slots, .. } => {
                Kv::Slots(super::slots::SlotPool::new(num_slots))
            }
        };
        let mut all: Vec<u64> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        all.sort_by_key(|id| self.seqs.get(id).map_or(u64::MAX, |s| s.arrival));
        self.waiting.extend(all);
        for seq in self.seqs.values_mut() {
            seq.forget_kv();
            seq.on_worker = false;
        }
    }
}

/// Enters the sequence's newly computed full blocks into the prefix cache, in order, each
/// under its parent's node; a collision stops the chain for this sequence.
fn cache_full_blocks(pool: &mut BlockPool, seq: &mut Sequence) {
    let bs = pool.block_size();
    while !seq.chain_broken && seq.chain.len() < seq.computed / bs {
        let i = seq.chain.len();
        let parent = seq.chain.last().copied();
        match pool.register(seq.blocks[i], parent, &seq.tokens[i * bs..(i + 1) * bs]) {
            Some(node) => seq.chain.push(node),
            None => seq.chain_broken = true,
        }
    }
}

/// Why the sequence ends after its latest sample, if it does.
fn finish_reason(seq: &Sequence, max_model_len: usize) -> Option<FinishReason> {
    let last = *seq.tokens.last()?;
    if seq.stop_ids.contains(&last) {
        Some(FinishReason::Stop)
    } else if seq.generated() >= seq.max_tokens || seq.tokens.len() >= max_model_len {
        Some(FinishReason::Length)
    } else {
        None
    }
}
