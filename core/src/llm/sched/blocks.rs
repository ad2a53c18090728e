//! The paged KV block pool: reference counts, the free list, and the prefix cache.
//!
//! A block belongs to the sequences that hold it (`refs`). Only a full block of computed
//! tokens may be held by several sequences: it is then read-only (sequences only append
//! past it). A block whose tokens are cached (`cached`) stays findable after its last
//! holder lets go: it waits in the LRU list and is evicted (uncached) only when no plain
//! free block is left.
//!
//! The cache index maps a chained block hash to a block, but the hash is only an index: a
//! hit also compares the block's tokens and its parent node (block id and generation, so a
//! parent evicted and reused for other tokens breaks the chain). A collision is a miss,
//! never wrong KV.

use super::hash::{HashFn, block_hash};
use std::collections::{BTreeMap, HashMap};

pub(super) type BlockId = u32;

/// A cached block as it was when found or registered: reusing a block for other tokens
/// bumps its generation, so a stale `NodeRef` no longer matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NodeRef {
    pub block: BlockId,
    pub generation: u32,
}

/// A cache node: a full block of computed tokens, findable by its chained hash.
#[derive(Clone)]
struct Cached {
    hash: u64,
    parent: Option<NodeRef>,
    tokens: Box<[u32]>,
}

/// A cached block a new sequence can reuse, with its chained hash.
#[derive(Clone, Copy, Debug)]
pub(super) struct Hit {
    pub hash: u64,
    pub node: NodeRef,
}

#[derive(Clone)]
pub(super) struct BlockPool {
    block_size: usize,
    refs: Vec<u32>,
    generation: Vec<u32>,
    cached: Vec<Option<Cached>>,
    /// Free blocks with nothing cached: handed out first.
    plain: Vec<BlockId>,
    /// Free cached blocks by the tick they were freed at: the oldest is evicted first.
    lru: BTreeMap<u64, BlockId>,
    lru_tick: Vec<u64>,
    tick: u64,
    index: HashMap<u64, BlockId>,
    hash: HashFn,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> BlockPool {
        BlockPool::with_hash(num_blocks, block_size, block_hash)
    }

    pub fn with_hash(num_blocks: usize, block_size: usize, hash: HashFn) -> BlockPool {
        BlockPool {
            block_size,
            refs: vec![0; num_blocks],
            generation: vec![0; num_blocks],
            cached: (0..num_blocks).map(|_| None).collect(),
            // Reversed so that block 0 is handed out first (readable tables in tests).
            plain: (0..num_blocks as BlockId).rev().collect(),
            lru: BTreeMap::new(),
            lru_tick: vec![0; num_blocks],
            tick: 0,
            index: HashMap::new(),
            hash,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that `allocate` can hand out (plain free ones, then cached ones no one holds).
    pub fn available(&self) -> usize {
        self.plain.len() + self.lru.len()
    }

    pub fn refs(&self, block: BlockId) -> u32 {
        self.refs[block as usize]
    }

    /// A fresh block for one sequence, evicting the least recently freed cached block when
    /// no plain one is left.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.plain.pop() {
            Some(block) => block,
            None => {
                let (_, block) = self.lru.pop_first()?;
                self.uncache(block);
                block
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// One holder lets go; the last one returns the block to the free list (cached ones to
    /// the LRU list, still findable).
    pub fn free(&mut self, block: BlockId) {
        let b = block as usize;
        self.refs[b] -= 1;
        if self.refs[b] > 0 {
            return;
        }
        if self.cached[b].is_some() {
            self.tick += 1;
            self.lru.insert(self.tick, block);
            self.lru_tick[b] = self.tick;
        } else {
            self.plain.push(block);
        }
    }

    /// One more holder of a cached block found by `lookup`.
    pub fn acquire(&mut self, block: BlockId) {
        let b = block as usize;
        if self.refs[b] == 0 {
            self.lru.remove(&self.lru_tick[b]);
        }
        self.refs[b] += 1;
    }

    /// The cached blocks that hold `tokens`' leading full blocks, at most `max_blocks`.
    pub fn lookup(&self, tokens: &[u32], max_blocks: usize) -> Vec<Hit> {
        let mut hits: Vec<Hit> = Vec::new();
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let parent = hits.last().copied();
            let hash = (self.hash)(parent.map(|p| p.hash), chunk);
            let Some(&block) = self.index.get(&hash) else {
                break;
            };
            let Some(node) = &self.cached[block as usize] else {
                break;
            };
            if *node.tokens != *chunk || node.parent != parent.map(|p| p.node) {
                break;
            }
            hits.push(Hit {
                hash,
                node: self.node(block),
            });
        }
        hits
    }

    /// Caches `block`, a full block of computed `tokens` following `parent` (None for a
    /// sequence's first block). Returns the node that now holds these tokens (this block, or
    /// an equal one cached before), or None on a collision: the chain stops there.
    pub fn register(&mut self, block: BlockId, parent: Option<Hit>, tokens: &[u32]) -> Option<Hit> {
        let hash = (self.hash)(parent.map(|p| p.hash), tokens);
        let parent_node = parent.map(|p| p.node);
        if let Some(&other) = self.index.get(&hash) {
            let node = self.cached[other as usize].as_ref()?;
            if *node.tokens == *tokens && node.parent == parent_node {
                return Some(Hit {
                    hash,
                    node: self.node(other),
                });
            }
            let stale = node.parent.is_some_and(|p| !self.is_live(p));
            if !stale {
                return None;
            }
            self.drop_node(other);
        }
        self.cached[block as usize] = Some(Cached {
            hash,
            parent: parent_node,
            tokens: tokens.into(),
        });
        self.index.insert(hash, block);
        Some(Hit {
            hash,
            node: self.node(block),
        })
    }

    fn node(&self, block: BlockId) -> NodeRef {
        NodeRef {
            block,
            generation: self.generation[block as usize],
        }
    }

    fn is_live(&self, node: NodeRef) -> bool {
        self.generation[node.block as usize] == node.generation
            && self.cached[node.block as usize].is_some()
    }

    /// Forgets a cached node whose parent was evicted (it can never be found again); a free
    /// one moves to the plain free list.
    fn drop_node(&mut self, block: BlockId) {
        let b = block as usize;
        self.uncache(block);
        if self.refs[b] == 0 {
            self.lru.remove(&self.lru_tick[b]);
            self.plain.push(block);
        }
    }

    fn uncache(&mut self, block: BlockId) {
        let b = block as usize;
        if let Some(node) = self.cached[b].take() {
            if self.index.get(&node.hash) == Some(&block) {
                self.index.remove(&node.hash);
            }
            self.generation[b] = self.generation[b].wrapping_add(1);
        }
    }

    /// The pool's own invariants (free lists against reference counts, the index).
    pub fn audit(&self) -> Result<(), String> {
        let mut free = vec![false; self.total()];
        for &b in self.plain.iter().chain(self.lru.values()) {
            let b = b as usize;
            if free[b] || self.refs[b] != 0 {
                return Err(format!("block {b} listed free twice or while held"));
            }
            free[b] = true;
        }
        for (b, is_free) in free.iter().enumerate() {
            if !is_free && self.refs[b] == 0 {
                return Err(format!("block {b} is held by no one but not free"));
            }
            if self.plain.contains(&(b as BlockId)) && self.cached[b].is_some() {
                return Err(format!("cached block {b} is on the plain free list"));
            }
        }
        for (hash, &b) in &self.index {
            match &self.cached[b as usize] {
                Some(node) if node.hash == *hash && node.tokens.len() == self.block_size => {}
                _ => {
                    return Err(format!(
                        "index entry {hash:x} points at block {b}, not cached"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collide(_: Option<u64>, _: &[u32]) -> u64 {
        7
    }

    /// Registers `tokens`' full blocks in fresh blocks, as a sequence would, then frees them.
    fn compute(pool: &mut BlockPool, tokens: &[u32]) -> Vec<BlockId> {
        let mut parent = None;
        let mut blocks = Vec::new();
        for chunk in tokens.chunks_exact(pool.block_size()) {
            let block = pool.allocate().unwrap();
            parent = pool.register(block, parent, chunk);
            blocks.push(block);
        }
        for &b in blocks.iter().rev() {
            pool.free(b);
        }
        blocks
    }

    #[test]
    fn a_hash_collision_is_a_miss_not_wrong_kv() {
        let mut pool = BlockPool::with_hash(4, 2, collide);
        compute(&mut pool, &[1, 2]);
        assert_eq!(pool.lookup(&[1, 2], 1).len(), 1);
        assert!(
            pool.lookup(&[3, 4], 1).is_empty(),
            "same hash, other tokens"
        );
        // A second block with the same hash but another parent is not cached at all.
        let b = pool.allocate().unwrap();
        assert!(pool.register(b, None, &[3, 4]).is_none());
        pool.free(b);
        pool.audit().unwrap();
    }

    #[test]
    fn equal_blocks_are_found_through_their_chain() {
        let mut pool = BlockPool::new(8, 2);
        compute(&mut pool, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(pool.lookup(&[1, 2, 3, 4, 9, 9], 3).len(), 2);
        assert_eq!(pool.lookup(&[1, 2, 3, 4, 5, 6], 2).len(), 2, "capped");
        assert!(
            pool.lookup(&[9, 2, 3, 4], 2).is_empty(),
            "same block 1, other parent"
        );
        pool.audit().unwrap();
    }

    #[test]
    fn plain_blocks_go_first_then_the_least_recently_freed_cached_one() {
        let mut pool = BlockPool::new(3, 1);
        let computed = compute(&mut pool, &[1, 2]);
        assert_eq!(pool.available(), 3);
        let fresh = pool.allocate().unwrap();
        assert!(!computed.contains(&fresh), "the plain block first");
        // Freed tail first, so the tail block (token 2) is the oldest and goes next.
        assert_eq!(pool.allocate(), Some(computed[1]));
        assert_eq!(pool.lookup(&[1, 2], 2).len(), 1, "the head is still cached");
        pool.audit().unwrap();
    }

    #[test]
    fn a_child_of_an_evicted_parent_is_never_found_under_a_new_parent() {
        let mut pool = BlockPool::with_hash(2, 1, |parent, tokens| {
            // The chain of [1, 2] and of [3, 2] hash the same at block 1.
            if parent.is_some() {
                100 + tokens[0] as u64
            } else {
                tokens[0] as u64
            }
        });
        let x = pool.allocate().unwrap();
        let y = pool.allocate().unwrap();
        let head = pool.register(x, None, &[1]);
        pool.register(y, head, &[2]);
        // The parent is freed first, so it is the one evicted to make room for [3].
        pool.free(x);
        pool.free(y);
        let parent = pool.allocate().unwrap();
        assert_eq!(parent, x);
        pool.register(parent, None, &[3]);
        assert_eq!(
            pool.lookup(&[3, 2], 2).len(),
            1,
            "block 1 is not [3]'s child"
        );
        pool.free(parent);
        pool.audit().unwrap();
    }
}
