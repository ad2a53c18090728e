"""The output-arena allocator: alignment, first fit, free by id in any order, coalescing."""

import random

import pytest

from unimodel.allocator import ALIGN, OutputArena, align_up


def test_blocks_are_aligned_and_first_fit():
    arena = OutputArena(1024)
    assert arena.alloc(1, owner=1) == 0
    assert arena.alloc(65, owner=2) == 64
    assert arena.alloc(64, owner=3) == 192
    assert all(off % ALIGN == 0 for off in (0, 64, 192))
    assert align_up(0) == 0 and align_up(1) == 64 and align_up(64) == 64 and align_up(65) == 128
    assert arena.used() == 256 and len(arena) == 3


def test_capacity_is_rounded_down_and_oversize_never_fits():
    arena = OutputArena(1000)
    assert arena.capacity == 960
    assert arena.alloc(961, owner=1) is None
    assert arena.alloc(960, owner=1) == 0


def test_release_frees_exactly_that_id_in_any_order():
    arena = OutputArena(512)
    assert arena.alloc(128, owner=1) == 0  # a slow request's result, held
    assert arena.alloc(128, owner=2) == 128
    assert arena.alloc(256, owner=3) == 256
    assert arena.alloc(64, owner=4) is None
    # Release of id 2 frees id 2 only (v1 freed every id <= 2, id 1 included).
    assert arena.release(2)
    assert arena.holds(1) and not arena.holds(2) and arena.holds(3)
    assert arena.alloc(128, owner=4) == 128
    assert not arena.release(2), "releasing again frees nothing"
    assert not arena.release(99), "an id without a block (a stream's end) frees nothing"
    assert arena.release(3)
    assert arena.alloc(256, owner=5) == 256
    assert len(arena) == 3


def test_neighbours_coalesce():
    arena = OutputArena(256)
    assert [arena.alloc(64, owner=i) for i in range(4)] == [0, 64, 128, 192]
    assert arena.alloc(1, owner=4) is None
    arena.release(2)
    arena.release(1)  # merges with 2's range: 128 contiguous bytes at 64
    assert arena.alloc(128, owner=5) == 64
    arena.release(5)
    arena.release(0)
    arena.release(3)
    assert arena.used() == 0
    assert arena.alloc(256, owner=6) == 0, "everything merged back into one range"


def test_one_block_per_id():
    arena = OutputArena(1024)
    arena.alloc(64, owner=7)
    with pytest.raises(ValueError, match="already holds"):
        arena.alloc(64, owner=7)


def test_random_run_never_overlaps():
    arena = OutputArena(4096)
    rng = random.Random(5)
    live: dict[int, tuple[int, int]] = {}
    for owner in range(20_000):
        size = rng.randrange(0, 1500)
        start = arena.alloc(size, owner)
        if start is None:
            victim = rng.choice(list(live))
            assert arena.release(victim)
            del live[victim]
            continue
        end = start + align_up(max(size, 1))
        assert start % ALIGN == 0 and end <= 4096
        for s, e in live.values():
            assert end <= s or e <= start
        live[owner] = (start, end)
        assert arena.used() == sum(e - s for s, e in live.values())
    for owner in list(live):
        arena.release(owner)
    assert arena.alloc(4096, owner=-1) == 0
