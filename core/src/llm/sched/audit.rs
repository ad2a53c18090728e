//! The scheduler's invariants, checked from scratch: property tests call `Policy::audit`
//! after every step.

use super::policy::{Kv, Policy};
use std::collections::HashMap;

impl Policy {
    /// Checks every invariant of the state and the pool; the error names the first broken.
    ///
    /// - every sequence is either running (holding KV) or waiting (holding none), once;
    /// - running sequences are in arrival order, at most `max_num_seqs`;
    /// - a block's reference count is the number of sequences holding it, and a block held
    ///   by several is a full computed block at the same index of each, whose tokens match;
    /// - between steps a sequence holds exactly the blocks its computed tokens need;
    /// - slots are held by one sequence each and are not free.
    pub fn audit(&self) -> Result<(), String> {
        let mut seen = HashMap::new();
        for (i, id) in self.running.iter().chain(&self.waiting).enumerate() {
            if seen.insert(*id, i < self.running.len()).is_some() {
                return Err(format!("sequence {id} is queued twice"));
            }
            if !self.seqs.contains_key(id) {
                return Err(format!("sequence {id} is queued but unknown"));
            }
        }
        if seen.len() != self.seqs.len() {
            return Err("a sequence is neither running nor waiting".into());
        }
        if self.running.len() > self.config.max_num_seqs {
            return Err(format!("{} sequences run", self.running.len()));
        }
        let arrivals: Vec<u64> = self
            .running
            .iter()
            .map(|id| self.seqs[id].arrival)
            .collect();
        if !arrivals.is_sorted() {
            return Err(format!("running set out of arrival order: {arrivals:?}"));
        }
        for id in &self.waiting {
            let seq = &self.seqs[id];
            if !seq.blocks.is_empty() || seq.slot.is_some() || seq.computed != 0 {
                return Err(format!("waiting sequence {id} holds KV"));
            }
        }
        match &self.kv {
            Kv::Paged(pool) => self.audit_blocks(pool),
            Kv::Slots(pool) => {
                let mut held = HashMap::new();
                for id in &self.running {
                    let slot = self.seqs[id]
                        .slot
                        .ok_or(format!("running {id} has no slot"))?;
                    if held.insert(slot, *id).is_some() || pool.is_free(slot) {
                        return Err(format!("slot {slot} held twice or while free"));
                    }
                }
                Ok(())
            }
        }
    }

    fn audit_blocks(&self, pool: &super::blocks::BlockPool) -> Result<(), String> {
        pool.audit()?;
        let bs = pool.block_size();
        // block → (index in the table, holder) of every holder.
        let mut holders: HashMap<u32, Vec<(usize, u64)>> = HashMap::new();
        for id in &self.running {
            let seq = &self.seqs[id];
            let needed = seq.computed.div_ceil(bs);
            let exact = self.in_flight.is_some() || seq.blocks.len() == needed;
            if seq.blocks.len() < needed || !exact {
                return Err(format!(
                    "sequence {id} holds {} blocks for {} computed tokens",
                    seq.blocks.len(),
                    seq.computed
                ));
            }
            for (i, &b) in seq.blocks.iter().enumerate() {
                holders.entry(b).or_default().push((i, *id));
            }
        }
        for b in 0..pool.total() as u32 {
            let held = holders.get(&b).map_or(&[][..], |h| h.as_slice());
            if pool.refs(b) as usize != held.len() {
                return Err(format!(
                    "block {b}: {} refs, {} holders",
                    pool.refs(b),
                    held.len()
                ));
            }
            let Some(&(i, first)) = held.first() else {
                continue;
            };
            let range = i * bs..(i + 1) * bs;
            for &(j, other) in &held[1..] {
                let (a, o) = (&self.seqs[&first], &self.seqs[&other]);
                let full = a.computed >= range.end && o.computed >= range.end;
                if j != i || !full || a.tokens[range.clone()] != o.tokens[range.clone()] {
                    return Err(format!("block {b} shared by {first} and {other} unequally"));
                }
            }
        }
        Ok(())
    }
}
