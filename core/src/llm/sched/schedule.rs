//! Building one step within the token budget: running sequences' decode tokens first, then
//! prompt chunks of partly prefilled sequences, then waiting requests in arrival order
//! (chunked prefill: a long prompt is split across steps, only its last chunk samples).
//!
//! When the pool runs out, the latest-arrived running sequence not yet scheduled in this
//! step is preempted by recompute: its KV is freed (cached full blocks stay findable) and it
//! goes back to the head of the waiting queue with everything it generated, to be fed again
//! as its prompt. A waiting request is admitted only when its first chunk fits as it is; it
//! never preempts.

use super::SchedError;
use super::plan::{KvStep, SeqStep, StepPlan};
use super::policy::{Fed, Kv, Policy};
use super::slots::shared_prefix;

/// The step being built.
struct Step {
    plan: StepPlan,
    budget: usize,
    fed: Vec<Fed>,
}

impl Policy {
    /// The next step (possibly empty: nothing to run, maybe sequences to release).
    pub fn plan(&mut self) -> Result<StepPlan, SchedError> {
        if self.in_flight.is_some() {
            return Err(SchedError::StepInFlight);
        }
        self.plans += 1;
        if let Kv::Slots(pool) = &mut self.kv {
            pool.unpin_all();
        }
        let mut step = Step {
            plan: StepPlan {
                release: std::mem::take(&mut self.release),
                ..StepPlan::default()
            },
            budget: self.config.max_num_batched_tokens,
            fed: Vec::new(),
        };
        self.schedule_decodes(&mut step);
        self.schedule_prefills(&mut step);
        self.admit_waiting(&mut step);
        // Retained slots reused by this plan: released before the step feeds them.
        step.plan.release.append(&mut self.release);
        if !step.fed.is_empty() {
            self.in_flight = Some(step.fed);
        }
        Ok(step.plan)
    }

    /// One token for each running sequence that has one left to feed, oldest first. A
    /// sequence that needs a block nobody can give preempts the latest-arrived (not yet
    /// scheduled, since they come in arrival order) running sequence, possibly itself.
    fn schedule_decodes(&mut self, step: &mut Step) {
        let mut i = 0;
        while i < self.running.len() && step.budget > 0 {
            let id = self.running[i];
            if self.seqs.get(&id).is_none_or(|s| s.remaining() != 1) {
                i += 1;
                continue;
            }
            if self.room(id) >= 1 {
                self.emit(id, 1, step);
                i += 1;
            } else if let Some(&victim) = self.running.last() {
                self.preempt(victim, step);
            }
        }
    }

    /// The next chunk of each partly prefilled sequence, oldest first, preempting later
    /// unscheduled ones for room, else shrinking the chunk to the room there is.
    fn schedule_prefills(&mut self, step: &mut Step) {
        let mut i = 0;
        while i < self.running.len() && step.budget > 0 {
            let id = self.running[i];
            i += 1;
            let Some(seq) = self.seqs.get(&id) else {
                continue;
            };
            if seq.remaining() <= 1 || seq.planned == self.plans {
                continue;
            }
            let wanted = seq.remaining().min(step.budget);
            while self.room(id) < wanted {
                let later = self.running[i..]
                    .iter()
                    .rev()
                    .find(|v| self.seqs.get(v).is_some_and(|s| s.planned != self.plans));
                match later {
                    Some(&victim) => self.preempt(victim, step),
                    None => break,
                }
            }
            let chunk = wanted.min(self.room(id));
            if chunk > 0 {
                self.emit(id, chunk, step);
            }
        }
    }

    /// Waiting requests in order while the budget, `max_num_seqs` and the pool allow.
    fn admit_waiting(&mut self, step: &mut Step) {
        while step.budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                return;
            };
            let Some(chunk) = self.admit(id, step.budget) else {
                return;
            };
            self.waiting.pop_front();
            let arrival = self.seqs.get(&id).map_or(u64::MAX, |s| s.arrival);
            let at = self
                .running
                .partition_point(|r| self.seqs.get(r).is_some_and(|s| s.arrival < arrival));
            self.running.insert(at, id);
            self.emit(id, chunk, step);
        }
    }

    /// Gives a waiting sequence its KV (reusing a cached or copied prefix) if its first
    /// chunk fits; returns that chunk's length.
    fn admit(&mut self, id: u64, budget: usize) -> Option<usize> {
        let caching = self.config.prefix_caching;
        let plans = self.plans;
        let mut source = match &self.kv {
            Kv::Slots(_) if caching => self.copy_source(id),
            _ => None,
        };
        let seq = self.seqs.get_mut(&id)?;
        match &mut self.kv {
            Kv::Paged(pool) => {
                let bs = pool.block_size();
                let hits = if caching {
                    pool.lookup(&seq.tokens, (seq.tokens.len() - 1) / bs)
                } else {
                    Vec::new()
                };
                let cached = hits.len() * bs;
                let chunk = (seq.tokens.len() - cached).min(budget);
                let needed = (cached + chunk).div_ceil(bs) - hits.len();
                let reclaimed = hits.iter().filter(|h| pool.refs(h.node.block) == 0).count();
                if needed + reclaimed > pool.available() {
                    return None;
                }
                for hit in &hits {
                    pool.acquire(hit.node.block);
                }
                seq.blocks = hits.iter().map(|h| h.node.block).collect();
                seq.blocks
                    .extend((0..needed).filter_map(|_| pool.allocate()));
                seq.chain = hits;
                seq.computed = cached;
                if caching {
                    self.totals.prefix_queried_tokens += seq.tokens.len() as u64;
                    self.totals.prefix_hit_tokens += cached as u64;
                }
                seq.admitted = plans;
                Some(chunk)
            }
            Kv::Slots(pool) => {
                let pinned = source.is_some_and(|(src, _)| pool.pin(src));
                let (slot, evicted) = match (pool.allocate(), source) {
                    (Some(got), _) => got,
                    // The only slot left is the retained source itself: reuse it, no copy
                    // (unless an earlier admission of this plan copies from it).
                    (None, Some((src, _))) if pinned => {
                        pool.unpin(src);
                        source = None;
                        pool.allocate()?
                    }
                    (None, _) => return None,
                };
                self.release.extend(evicted);
                seq.slot = Some(slot);
                if let Some((src, cells)) = source {
                    seq.copy_from = Some((src, cells));
                    seq.computed = cells;
                }
                if caching {
                    self.totals.prefix_queried_tokens += seq.tokens.len() as u64;
                    self.totals.prefix_hit_tokens += seq.computed as u64;
                }
                seq.admitted = plans;
                Some((seq.tokens.len() - seq.computed).min(budget))
            }
        }
    }

    /// Slots KV: the slot holding the longest shared prefix of `id`'s tokens: a running
    /// sequence's (cells of completed steps only, so none admitted in this plan) or a
    /// retained finished one's. A tie goes to the lowest slot.
    fn copy_source(&self, id: u64) -> Option<(u32, usize)> {
        let Kv::Slots(pool) = &self.kv else {
            return None;
        };
        let tokens = &self.seqs.get(&id)?.tokens;
        let running = self
            .running
            .iter()
            .filter_map(|r| self.seqs.get(r))
            .filter(|s| s.admitted < self.plans)
            .filter_map(|s| Some((s.slot?, &s.tokens[..s.computed])));
        running
            .chain(pool.sources())
            .map(|(slot, cells)| (slot, shared_prefix(tokens, cells)))
            .filter(|&(_, cells)| cells > 0)
            .max_by_key(|&(slot, cells)| (cells, std::cmp::Reverse(slot)))
    }

    /// Tokens `id` can be scheduled with the blocks it has plus those free.
    fn room(&self, id: u64) -> usize {
        let Some(seq) = self.seqs.get(&id) else {
            return 0;
        };
        match &self.kv {
            Kv::Paged(pool) => {
                (seq.blocks.len() + pool.available()) * pool.block_size() - seq.computed
            }
            Kv::Slots(_) => usize::MAX,
        }
    }

    /// Schedules `chunk` tokens of `id` (the room for them is there) into the step.
    fn emit(&mut self, id: u64, chunk: usize, step: &mut Step) {
        let plans = self.plans;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let start = seq.computed;
        let kv = match &mut self.kv {
            Kv::Paged(pool) => {
                let bs = pool.block_size();
                let needed = (start + chunk)
                    .div_ceil(bs)
                    .saturating_sub(seq.blocks.len());
                seq.blocks
                    .extend((0..needed).filter_map(|_| pool.allocate()));
                let slot_mapping = (start..start + chunk)
                    .map(|p| seq.blocks[p / bs] as u64 * bs as u64 + (p % bs) as u64)
                    .collect();
                KvStep::Paged {
                    block_table: seq.blocks.clone(),
                    slot_mapping,
                }
            }
            Kv::Slots(_) => {
                let Some(slot) = seq.slot else {
                    return;
                };
                KvStep::Slots {
                    slot,
                    copy_from: seq.copy_from.take(),
                }
            }
        };
        let sample = start + chunk == seq.tokens.len();
        seq.planned = plans;
        seq.on_worker = true;
        step.budget -= chunk;
        step.fed.push(Fed {
            seq_id: id,
            tokens: chunk,
            sample,
        });
        step.plan.seqs.push(SeqStep {
            seq_id: id,
            tokens: seq.tokens[start..start + chunk].to_vec(),
            start_pos: start,
            sample,
            kv,
        });
    }

    /// Recompute: frees the sequence's KV and puts it at the head of the waiting queue with
    /// its generated tokens, which are fed again as prompt when it is admitted again.
    fn preempt(&mut self, id: u64, step: &mut Step) {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return;
        };
        self.free_kv(&mut seq);
        self.seqs.insert(id, seq);
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
        self.totals.preemptions += 1;
        step.plan.preempted.push(id);
    }
}
