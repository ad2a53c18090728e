//! Slots KV (engines with their own cache, e.g. llama.cpp): one slot per running sequence,
//! and shared prompt prefixes found in blocks of `SLOTS_PREFIX_BLOCK` tokens and expressed
//! as a copy of cells from a slot that holds them.

use super::SLOTS_PREFIX_BLOCK;
use std::collections::{BTreeMap, BTreeSet};

/// A finished sequence's slot kept with its cells, as a prefix source, until it is needed.
#[derive(Clone)]
struct Retained {
    slot: u32,
    seq_id: u64,
    cells: Vec<u32>,
}

#[derive(Clone)]
pub(super) struct SlotPool {
    total: usize,
    /// Free slots holding nothing. The lowest is handed out first, so running slots stay
    /// dense: llama.cpp decodes one micro-batch per run of consecutive slot ids
    /// (plugins/llm/llama_cpp.py).
    free: BTreeSet<u32>,
    /// Free slots still holding a finished sequence's cells (not yet released on the
    /// worker), by the tick they were retained at: the oldest is reused first.
    retained: BTreeMap<u64, Retained>,
    tick: u64,
    /// Retained slots copied from in the plan being built: their cells must survive it.
    pinned: BTreeSet<u32>,
}

impl SlotPool {
    pub fn new(num_slots: usize) -> SlotPool {
        SlotPool {
            total: num_slots,
            free: (0..num_slots as u32).collect(),
            retained: BTreeMap::new(),
            tick: 0,
            pinned: BTreeSet::new(),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Slots a new sequence can get (retained ones included).
    pub fn available(&self) -> usize {
        self.free.len() + self.retained.len()
    }

    /// A slot for a new sequence: an empty one, else the oldest retained one not pinned,
    /// whose sequence must then be released on the worker (returned with it) before the
    /// slot is fed.
    pub fn allocate(&mut self) -> Option<(u32, Option<u64>)> {
        if let Some(slot) = self.free.pop_first() {
            return Some((slot, None));
        }
        let tick = *self
            .retained
            .iter()
            .find(|(_, r)| !self.pinned.contains(&r.slot))?
            .0;
        let old = self.retained.remove(&tick)?;
        Some((old.slot, Some(old.seq_id)))
    }

    /// Keeps a retained slot's cells through the plan being built (a copy source); false
    /// if it already was.
    pub fn pin(&mut self, slot: u32) -> bool {
        self.pinned.insert(slot)
    }

    pub fn unpin(&mut self, slot: u32) {
        self.pinned.remove(&slot);
    }

    /// A new plan: last plan's copies are done.
    pub fn unpin_all(&mut self) {
        self.pinned.clear();
    }

    /// A sequence ended: its slot is free for others at once.
    pub fn free(&mut self, slot: u32) {
        self.free.insert(slot);
    }

    /// A sequence ended but its cells stay on the worker as a prefix source.
    pub fn retain(&mut self, slot: u32, seq_id: u64, cells: Vec<u32>) {
        self.tick += 1;
        self.retained.insert(
            self.tick,
            Retained {
                slot,
                seq_id,
                cells,
            },
        );
    }

    /// Empties every retained slot; returns the sequences to release.
    pub fn release_retained(&mut self) -> Vec<u64> {
        let released = self.retained.values().map(|r| r.seq_id).collect();
        for (_, r) in std::mem::take(&mut self.retained) {
            self.free.insert(r.slot);
        }
        released
    }

    /// Retained slots and their cells, as prefix sources.
    pub fn sources(&self) -> impl Iterator<Item = (u32, &[u32])> {
        self.retained.values().map(|r| (r.slot, r.cells.as_slice()))
    }

    pub fn is_free(&self, slot: u32) -> bool {
        self.free.contains(&slot) || self.retained.values().any(|r| r.slot == slot)
    }
}

/// Cells of `source` (its computed tokens) that `tokens` can copy: their common prefix in
/// whole blocks of `SLOTS_PREFIX_BLOCK` tokens, leaving at least one token of `tokens` to
/// feed (so there is a sample).
pub(super) fn shared_prefix(tokens: &[u32], source: &[u32]) -> usize {
    let most = tokens.len().saturating_sub(1).min(source.len()) / SLOTS_PREFIX_BLOCK;
    tokens
        .chunks_exact(SLOTS_PREFIX_BLOCK)
        .zip(source.chunks_exact(SLOTS_PREFIX_BLOCK))
        .take(most)
        .take_while(|(a, b)| a == b)
        .count()
        * SLOTS_PREFIX_BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_slot_goes_first() {
        let mut pool = SlotPool::new(4);
        let taken: Vec<u32> = (0..3)
            .filter_map(|_| pool.allocate())
            .map(|a| a.0)
            .collect();
        assert_eq!(taken, [0, 1, 2]);
        pool.free(2);
        pool.free(0);
        let next: Vec<_> = (0..3).filter_map(|_| pool.allocate()).collect();
        assert_eq!(next, [(0, None), (2, None), (3, None)]);
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn retained_slots_are_reused_oldest_first_but_never_one_copied_from() {
        let mut pool = SlotPool::new(3);
        for seq in 0..3 {
            let (slot, _) = pool.allocate().unwrap();
            pool.retain(slot, seq, vec![1; 16]);
        }
        assert_eq!(pool.available(), 3);
        assert!(pool.pin(0));
        assert_eq!(pool.allocate(), Some((1, Some(1))), "slot 0 is pinned");
        pool.unpin_all();
        assert_eq!(pool.allocate(), Some((0, Some(0))));
        assert_eq!(pool.release_retained(), vec![2]);
        assert_eq!(pool.allocate(), Some((2, None)));
    }

    #[test]
    fn the_shared_prefix_is_whole_blocks_and_leaves_a_token_to_feed() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[20] = 999;
        assert_eq!(shared_prefix(&a, &b), 16, "differs inside the second block");
        assert_eq!(shared_prefix(&a[..32], &a), 16, "one token must be fed");
        assert_eq!(shared_prefix(&a[..33], &a), 32);
        assert_eq!(
            shared_prefix(&a, &a[..20]),
            16,
            "only the source's computed cells"
        );
        assert_eq!(shared_prefix(&a[..10], &a), 0);
    }
}
