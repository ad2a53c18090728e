//! The block allocator behind both shared-memory arenas (pure bookkeeping; the memory itself
//! is in `shm.rs`).
//!
//! A worker answers executes in any order (protocol v2), so blocks are freed in any order:
//! the allocator is a first-fit free list of 64-byte-aligned ranges, coalescing neighbours on
//! free. The list is a `Vec` sorted by offset: it holds at most one range more than there
//! are live blocks (a handful: the executes in flight), so a scan beats a tree. The core frees an execute's input block when that
//! execute is answered (the in-flight table in `pipeline.rs` holds it by id). The Python side
//! (`python/unimodel/allocator.py`) runs the same rule on the output arena.

/// Every block and every tensor inside a block starts at a multiple of this, so numpy views
/// (and SIMD loads) over the arena are aligned for any datatype.
pub const ALIGN: usize = 64;

/// Rounds `n` up to a multiple of `ALIGN`; `None` on overflow.
pub fn align_up(n: usize) -> Option<usize> {
    n.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

/// A live block.
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
    /// Fits the arena, but not until live blocks are freed.
    #[error("arena full: {size} bytes must wait for live blocks to be freed")]
    Full { size: usize },
}

/// Why a free was refused (a bug of the caller: the allocator is left unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FreeError {
    #[error("block at offset {offset} (+{len}) lies outside the {capacity}-byte arena")]
    OutOfBounds {
        offset: usize,
        len: usize,
        capacity: usize,
    },
    #[error("block at offset {offset} (+{len}) is not live (freed twice?)")]
    NotLive { offset: usize, len: usize },
}

/// First-fit allocation of aligned blocks over `capacity` bytes.
#[derive(Debug)]
pub struct Allocator {
    capacity: usize,
    /// Free ranges `(offset, len)`, sorted by offset; never two adjacent (they are merged).
    free: Vec<(usize, usize)>,
    live: usize,
}

impl Allocator {
    /// `capacity` is rounded down to a multiple of `ALIGN`.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity & !(ALIGN - 1);
        let free = if capacity > 0 {
            vec![(0, capacity)]
        } else {
            Vec::new()
        };
        Allocator {
            capacity,
            free,
            live: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn live_blocks(&self) -> usize {
        self.live
    }

    /// Whether a block of `size` bytes could ever be allocated (the arena empty).
    pub fn fits(&self, size: usize) -> bool {
        align_up(size.max(1)).is_some_and(|s| s <= self.capacity)
    }

    /// Reserves a block of at least `size` bytes at the lowest offset where it fits.
    pub fn alloc(&mut self, size: usize) -> Result<Block, AllocError> {
        // A zero-size request still gets a distinct block, so that every execute owns one.
        let too_large = AllocError::TooLarge {
            size,
            capacity: self.capacity,
        };
        let len = align_up(size.max(1)).ok_or(too_large)?;
        if len > self.capacity {
            return Err(too_large);
        }
        let i = self
            .free
            .iter()
            .position(|&(_, room)| room >= len)
            .ok_or(AllocError::Full { size })?;
        let (offset, room) = self.free[i];
        if room > len {
            self.free[i] = (offset + len, room - len);
        } else {
            self.free.remove(i);
        }
        self.live += 1;
        Ok(Block { offset, len })
    }

    /// Frees a live block, whenever it was allocated, merging it with free neighbours.
    pub fn free(&mut self, block: Block) -> Result<(), FreeError> {
        let Block { offset, len } = block;
        let end = offset.checked_add(len).filter(|&e| e <= self.capacity);
        let Some(end) = end.filter(|_| len > 0 && offset.is_multiple_of(ALIGN)) else {
            return Err(FreeError::OutOfBounds {
                offset,
                len,
                capacity: self.capacity,
            });
        };
        // The first free range at or after the block, and the one before it.
        let i = self.free.partition_point(|&(o, _)| o < offset);
        let before = i.checked_sub(1).map(|j| self.free[j]);
        let after = self.free.get(i).copied();
        let overlaps_before = before.is_some_and(|(o, l)| o + l > offset);
        let overlaps_after = after.is_some_and(|(o, _)| o < end);
        if overlaps_before || overlaps_after {
            return Err(FreeError::NotLive { offset, len });
        }
        let joins_before = before.is_some_and(|(o, l)| o + l == offset);
        let joins_after = after.is_some_and(|(o, _)| o == end);
        match (joins_before, joins_after) {
            (true, true) => {
                let (_, next) = self.free.remove(i);
                self.free[i - 1].1 += len + next;
            }
            (true, false) => self.free[i - 1].1 += len,
            (false, true) => self.free[i] = (offset, len + self.free[i].1),
            (false, false) => self.free.insert(i, (offset, len)),
        }
        self.live = self.live.saturating_sub(1);
        Ok(())
    }

    /// Bytes in live blocks.
    pub fn used(&self) -> usize {
        self.capacity - self.free.iter().map(|&(_, l)| l).sum::<usize>()
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
    fn allocations_are_aligned_and_first_fit() {
        let mut a = Allocator::new(1024);
        let x = a.alloc(10).unwrap();
        let y = a.alloc(65).unwrap();
        let z = a.alloc(0).unwrap();
        assert_eq!((x.offset, x.len), (0, 64));
        assert_eq!((y.offset, y.len), (64, 128));
        assert_eq!((z.offset, z.len), (192, 64));
        assert_eq!(a.live_blocks(), 3);
        assert_eq!(a.used(), 256);
    }

    #[test]
    fn exact_fit_fills_the_arena() {
        let mut a = Allocator::new(256);
        let all = a.alloc(256).unwrap();
        assert_eq!(
            all,
            Block {
                offset: 0,
                len: 256
            }
        );
        assert_eq!(a.alloc(1), Err(AllocError::Full { size: 1 }));
        a.free(all).unwrap();
        let x = a.alloc(128).unwrap();
        let y = a.alloc(128).unwrap();
        assert_eq!((x.offset, y.offset), (0, 128));
        assert_eq!(a.alloc(1), Err(AllocError::Full { size: 1 }));
    }

    #[test]
    fn too_large_is_distinct_from_full() {
        let mut a = Allocator::new(256);
        let err = AllocError::TooLarge {
            size: 257,
            capacity: 256,
        };
        assert_eq!(a.alloc(257), Err(err));
        assert!(matches!(
            a.alloc(usize::MAX),
            Err(AllocError::TooLarge { .. })
        ));
        assert!(!a.fits(257));
        assert!(a.fits(256));
        assert_eq!(Allocator::new(1000).capacity(), 960);
    }

    /// The point of protocol v2: a block held by a slow execute does not hold back the blocks
    /// allocated after it.
    #[test]
    fn blocks_are_freed_in_any_order_and_their_room_reused() {
        let mut a = Allocator::new(512);
        let slow = a.alloc(128).unwrap(); // [0, 128)
        let b = a.alloc(128).unwrap(); // [128, 256)
        let c = a.alloc(256).unwrap(); // [256, 512)
        assert_eq!(a.alloc(64), Err(AllocError::Full { size: 64 }));
        a.free(b).unwrap();
        // The hole b left is reused while `slow` (older) is still live.
        assert_eq!(a.alloc(128).unwrap().offset, 128);
        a.free(c).unwrap();
        assert_eq!(a.alloc(200).unwrap().offset, 256);
        assert_eq!(a.live_blocks(), 3);
        a.free(slow).unwrap();
        assert_eq!(a.alloc(64).unwrap().offset, 0);
    }

    #[test]
    fn neighbours_coalesce_into_one_range() {
        let mut a = Allocator::new(4 * 64);
        let blocks: Vec<_> = (0..4).map(|_| a.alloc(64).unwrap()).collect();
        // Free the middle two in either order, then the ends: one range again.
        a.free(blocks[2]).unwrap();
        a.free(blocks[1]).unwrap();
        assert_eq!(a.alloc(128).unwrap().offset, 64, "the two holes merged");
        a.free(Block {
            offset: 64,
            len: 128,
        })
        .unwrap();
        a.free(blocks[0]).unwrap();
        a.free(blocks[3]).unwrap();
        assert_eq!(a.used(), 0);
        assert_eq!(a.alloc(256).unwrap().offset, 0);
    }

    #[test]
    fn bad_frees_are_refused_and_change_nothing() {
        let mut a = Allocator::new(1024);
        let x = a.alloc(64).unwrap();
        a.free(x).unwrap();
        assert_eq!(a.free(x), Err(FreeError::NotLive { offset: 0, len: 64 }));
        let y = a.alloc(128).unwrap();
        let z = Block {
            offset: 64,
            len: 128,
        };
        assert!(matches!(a.free(z), Err(FreeError::NotLive { .. })));
        let outside = Block {
            offset: 1024,
            len: 64,
        };
        assert!(matches!(
            a.free(outside),
            Err(FreeError::OutOfBounds { .. })
        ));
        a.free(y).unwrap();
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn long_random_run_never_overlaps_and_frees_everything() {
        let mut a = Allocator::new(4096);
        let mut live: Vec<Block> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let size = (next() % 1500) as usize;
            match a.alloc(size) {
                Ok(b) => {
                    assert_eq!(b.offset % ALIGN, 0);
                    assert!(b.offset + b.len <= 4096);
                    for l in &live {
                        assert!(
                            b.offset + b.len <= l.offset || l.offset + l.len <= b.offset,
                            "{b:?} overlaps {l:?}"
                        );
                    }
                    live.push(b);
                }
                Err(AllocError::Full { .. }) => {
                    // Free a random live block, not the oldest.
                    let i = (next() as usize) % live.len();
                    a.free(live.swap_remove(i)).unwrap();
                }
                Err(e) => panic!("{e}"),
            }
            assert_eq!(a.live_blocks(), live.len());
            assert_eq!(a.used(), live.iter().map(|b| b.len).sum::<usize>());
        }
        for b in live.drain(..) {
            a.free(b).unwrap();
        }
        assert_eq!(a.alloc(4096).unwrap().offset, 0, "fully coalesced");
    }

    #[test]
    fn layout_aligns_each_tensor() {
        assert_eq!(layout([24, 6, 100]), Some((vec![0, 64, 128], 228)));
        assert_eq!(layout([]), Some((vec![], 0)));
        assert_eq!(layout([0, 0]), Some((vec![0, 0], 0)));
    }
}
