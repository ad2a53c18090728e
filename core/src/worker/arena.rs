//! The ring allocator behind both shared-memory arenas (pure bookkeeping; the memory itself
//! is in `shm.rs`).
//!
//! Blocks are variable-size, start at 64-byte-aligned offsets and are freed in allocation
//! order, which is exactly the order the worker answers executes (and the order the core
//! releases results). An allocation that does not fit between the newest block and the end
//! wraps to offset 0 if it fits before the oldest live block. The layout rule is shared with
//! the Python side (`python/unimodel/`), which runs the same ring on the output arena.

use std::collections::VecDeque;

/// Every block and every tensor inside a block starts at a multiple of this, so numpy views
/// (and SIMD loads) over the arena are aligned for any datatype.
pub const ALIGN: usize = 64;

/// Rounds `n` up to a multiple of `ALIGN`; `None` on overflow.
pub fn align_up(n: usize) -> Option<usize> {
    n.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

/// A live block of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub offset: usize,
    /// Reserved length (aligned, at least `ALIGN`).
    pub len: usize,
}

/// Why an allocation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Larger than the whole arena: the caller must use a dedicated region.
    #[error("{size} bytes exceed the arena's {capacity}-byte capacity")]
    TooLarge { size: usize, capacity: usize },
    /// Fits the arena, but not until older blocks are freed.
    #[error("arena full: {size} bytes must wait for older blocks to be freed")]
    Full { size: usize },
}

/// Why a free was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FreeError {
    #[error("no live block to free")]
    Empty,
    #[error(
        "block at offset {offset} is not the oldest live block (offset {oldest}); blocks are freed in order"
    )]
    OutOfOrder { offset: usize, oldest: usize },
}

/// A ring of blocks over `capacity` bytes.
#[derive(Debug)]
pub struct Ring {
    capacity: usize,
    /// Live blocks, oldest first.
    blocks: VecDeque<Block>,
}

impl Ring {
    /// `capacity` is rounded down to a multiple of `ALIGN`.
    pub fn new(capacity: usize) -> Self {
        Ring {
            capacity: capacity & !(ALIGN - 1),
            blocks: VecDeque::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn live_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Whether a block of `size` bytes could ever be allocated (the arena empty).
    pub fn fits(&self, size: usize) -> bool {
        align_up(size.max(1)).is_some_and(|s| s <= self.capacity)
    }

    /// Reserves a block of at least `size` bytes.
    pub fn alloc(&mut self, size: usize) -> Result<Block, AllocError> {
        // A zero-size request still gets a distinct block so that in-order frees stay unambiguous.
        let len = align_up(size.max(1)).ok_or(AllocError::TooLarge {
            size,
            capacity: self.capacity,
        })?;
        if len > self.capacity {
            return Err(AllocError::TooLarge {
                size,
                capacity: self.capacity,
            });
        }
        let offset = self.place(len).ok_or(AllocError::Full { size })?;
        let block = Block { offset, len };
        self.blocks.push_back(block);
        Ok(block)
    }

    /// Where a block of `len` (aligned) bytes goes, if anywhere.
    fn place(&self, len: usize) -> Option<usize> {
        let (Some(oldest), Some(newest)) = (self.blocks.front(), self.blocks.back()) else {
            return Some(0);
        };
        let head = newest.offset + newest.len;
        let tail = oldest.offset;
        if newest.offset >= tail {
            // Live data is one run [tail, head): free space after it, then before it.
            if head + len <= self.capacity {
                Some(head)
            } else if len <= tail {
                Some(0)
            } else {
                None
            }
        } else if head + len <= tail {
            // Wrapped: the only free space is [head, tail).
            Some(head)
        } else {
            None
        }
    }

    /// Frees the oldest live block, which must be `block`.
    pub fn free(&mut self, block: Block) -> Result<(), FreeError> {
        let oldest = self.blocks.front().ok_or(FreeError::Empty)?;
        if *oldest != block {
            return Err(FreeError::OutOfOrder {
                offset: block.offset,
                oldest: oldest.offset,
            });
        }
        self.blocks.pop_front();
        Ok(())
    }

    /// Takes back the newest block (an allocation whose use failed before anyone saw it).
    pub fn free_newest(&mut self) -> Option<Block> {
        self.blocks.pop_back()
    }

    /// Frees the oldest live block, whichever it is.
    pub fn free_oldest(&mut self) -> Option<Block> {
        self.blocks.pop_front()
    }
}

/// Lays out tensors of the given byte lengths inside one block: each at a 64-byte-aligned
/// offset relative to the block start. Returns the offsets and the block size needed.
pub fn layout(lengths: impl IntoIterator<Item = usize>) -> Option<(Vec<usize>, usize)> {
    let mut offsets = Vec::new();
    let mut end = 0usize;
    for len in lengths {
        let start = align_up(end)?;
        offsets.push(start);
        end = start.checked_add(len)?;
    }
    Some((offsets, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_and_consecutive() {
        let mut r = Ring::new(1024);
        let a = r.alloc(10).unwrap();
        let b = r.alloc(65).unwrap();
        let c = r.alloc(0).unwrap();
        assert_eq!((a.offset, a.len), (0, 64));
        assert_eq!((b.offset, b.len), (64, 128));
        assert_eq!((c.offset, c.len), (192, 64));
    }

    #[test]
    fn exact_fit_fills_the_arena() {
        let mut r = Ring::new(256);
        assert_eq!(
            r.alloc(256).unwrap(),
            Block {
                offset: 0,
                len: 256
            }
        );
        assert_eq!(r.alloc(1), Err(AllocError::Full { size: 1 }));
        r.free_oldest();
        let a = r.alloc(128).unwrap();
        let b = r.alloc(128).unwrap();
        assert_eq!((a.offset, b.offset), (0, 128));
        assert_eq!(r.alloc(1), Err(AllocError::Full { size: 1 }));
    }

    #[test]
    fn too_large_is_distinct_from_full() {
        let mut r = Ring::new(256);
        assert_eq!(
            r.alloc(257),
            Err(AllocError::TooLarge {
                size: 257,
                capacity: 256
            })
        );
        assert_eq!(
            r.alloc(usize::MAX),
            Err(AllocError::TooLarge {
                size: usize::MAX,
                capacity: 256
            })
        );
        assert!(!r.fits(257));
        assert!(r.fits(256));
    }

    #[test]
    fn wraps_to_the_start_when_the_oldest_block_is_freed() {
        let mut r = Ring::new(512);
        let a = r.alloc(192).unwrap(); // [0, 192)
        let b = r.alloc(192).unwrap(); // [192, 384)
        // 192 more does not fit after b (384 + 192 > 512) nor before a (a is live).
        assert_eq!(r.alloc(192), Err(AllocError::Full { size: 192 }));
        r.free(a).unwrap();
        let c = r.alloc(192).unwrap();
        assert_eq!(c.offset, 0, "wrapped to the start");
        // Wrapped: free space is only [192, 192) now that b starts at 192.
        assert_eq!(r.alloc(64), Err(AllocError::Full { size: 64 }));
        r.free(b).unwrap();
        // c is the only block: run [0,192); next goes after it.
        assert_eq!(r.alloc(64).unwrap().offset, 192);
    }

    #[test]
    fn wrapped_ring_allocates_between_head_and_tail() {
        let mut r = Ring::new(1024);
        let a = r.alloc(512).unwrap(); // [0, 512)
        let _b = r.alloc(256).unwrap(); // [512, 768)
        r.free(a).unwrap();
        let c = r.alloc(384).unwrap(); // does not fit after b (768+384 > 1024): wraps
        assert_eq!(c.offset, 0);
        let d = r.alloc(128).unwrap(); // wrapped region [384, 512)
        assert_eq!(d.offset, 384);
        assert_eq!(r.alloc(64), Err(AllocError::Full { size: 64 }));
    }

    #[test]
    fn frees_must_be_in_order() {
        let mut r = Ring::new(1024);
        let a = r.alloc(64).unwrap();
        let b = r.alloc(64).unwrap();
        assert_eq!(
            r.free(b),
            Err(FreeError::OutOfOrder {
                offset: 64,
                oldest: 0
            })
        );
        r.free(a).unwrap();
        r.free(b).unwrap();
        assert_eq!(r.free(b), Err(FreeError::Empty));
        // Empty again: allocation restarts at 0.
        assert_eq!(r.alloc(64).unwrap().offset, 0);
    }

    #[test]
    fn long_random_run_never_overlaps() {
        let mut r = Ring::new(4096);
        let mut live: VecDeque<Block> = VecDeque::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let size = (seed % 1500) as usize;
            match r.alloc(size) {
                Ok(b) => {
                    assert_eq!(b.offset % ALIGN, 0);
                    assert!(b.offset + b.len <= 4096);
                    for l in &live {
                        assert!(
                            b.offset + b.len <= l.offset || l.offset + l.len <= b.offset,
                            "{b:?} overlaps {l:?}"
                        );
                    }
                    live.push_back(b);
                }
                Err(AllocError::Full { .. }) => {
                    let oldest = live.pop_front().unwrap();
                    r.free(oldest).unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn layout_aligns_each_tensor() {
        assert_eq!(layout([24, 6, 100]), Some((vec![0, 64, 128], 228)));
        assert_eq!(layout([]), Some((vec![], 0)));
        assert_eq!(layout([0, 0]), Some((vec![0, 0], 0)));
    }
}
