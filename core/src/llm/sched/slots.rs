//! Slots KV (engines with their own cache, e.g. llama.cpp): one slot per running sequence,
//! and shared prompt prefixes found in blocks of `SLOTS_PREFIX_BLOCK` tokens and expressed
//! as a copy of cells from a slot that holds them.

use super::SLOTS_PREFIX_BLOCK;
use std::collections::BTreeSet;

#[derive(Clone)]
pub(super) struct SlotPool {
    total: usize,
    /// Free slots. The lowest is handed out first, so running slots stay dense: llama.cpp
    /// decodes one micro-batch per run of consecutive slot ids (plugins/llm/llama_cpp.py).
    free: BTreeSet<u32>,
}

impl SlotPool {
    pub fn new(num_slots: usize) -> SlotPool {
        SlotPool {
            total: num_slots,
            free: (0..num_slots as u32).collect(),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    pub fn allocate(&mut self) -> Option<u32> {
        self.free.pop_first()
    }

    pub fn free(&mut self, slot: u32) {
        self.free.insert(slot);
    }

    pub fn is_free(&self, slot: u32) -> bool {
        self.free.contains(&slot)
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
        let taken: Vec<u32> = (0..3).filter_map(|_| pool.allocate()).collect();
        assert_eq!(taken, [0, 1, 2]);
        pool.free(2);
        pool.free(0);
        assert_eq!(
            (pool.allocate(), pool.allocate(), pool.allocate()),
            (Some(0), Some(2), Some(3))
        );
        assert_eq!(pool.allocate(), None);
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
