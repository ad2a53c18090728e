"""The output-arena ring allocator: alignment, wrap-around, in-order free, full ring."""

from unimodel.ring import ALIGN, OutputRing, align_up


def test_blocks_are_aligned_and_sequential():
    ring = OutputRing(1024)
    assert ring.alloc(1, owner=1) == 0
    assert ring.alloc(65, owner=2) == 64
    assert ring.alloc(64, owner=3) == 192
    assert all(off % ALIGN == 0 for off in (0, 64, 192))
    assert align_up(0) == 0 and align_up(1) == 64 and align_up(64) == 64 and align_up(65) == 128


def test_capacity_is_rounded_down_and_oversize_never_fits():
    ring = OutputRing(1000)
    assert ring.capacity == 960
    assert ring.alloc(961, owner=1) is None
    assert ring.alloc(960, owner=1) == 0


def test_wraps_to_zero_when_the_oldest_block_is_freed():
    ring = OutputRing(512)
    assert ring.alloc(192, owner=1) == 0
    assert ring.alloc(192, owner=2) == 192
    # 128 bytes left at the end: a 192-byte block does not fit there, nor before block 1.
    assert ring.alloc(192, owner=3) is None
    assert ring.release(1) == 1
    # Now it wraps to offset 0, before the oldest live block (2 at 192).
    assert ring.alloc(192, owner=3) == 0
    # Wrapped: free space is [192, 192) only: full until block 2 goes.
    assert ring.alloc(64, owner=4) is None
    ring.release(2)
    assert ring.alloc(64, owner=4) == 192


def test_free_is_in_order_and_covers_every_id_up_to():
    ring = OutputRing(4096)
    for owner in range(1, 6):
        ring.alloc(100, owner)
    assert len(ring) == 5
    assert ring.release(0) == 0
    assert ring.release(3) == 3
    assert len(ring) == 2
    assert ring.release(3) == 0  # releasing again frees nothing
    assert ring.release(10) == 2
    assert len(ring) == 0
    assert ring.used() == 0
    # Empty ring restarts at 0.
    assert ring.alloc(64, owner=11) == 0


def test_several_blocks_of_one_owner_free_together():
    ring = OutputRing(1024)
    ring.alloc(64, owner=7)  # stream chunk 1
    ring.alloc(64, owner=7)  # stream chunk 2
    ring.alloc(64, owner=8)
    assert ring.release(7) == 2
    assert len(ring) == 1


def test_exactly_full_ring_then_wrap_after_release():
    ring = OutputRing(256)
    assert [ring.alloc(64, owner=i) for i in range(4)] == [0, 64, 128, 192]
    assert ring.alloc(1, owner=4) is None
    ring.release(0)
    assert ring.alloc(64, owner=4) == 0
    assert ring.alloc(64, owner=5) is None
    ring.release(2)
    assert ring.alloc(128, owner=5) == 64
    assert ring.used() == 256


def test_holds_tells_whether_a_streams_last_chunk_is_still_live():
    ring = OutputRing(1024)
    assert not ring.holds(3)
    ring.alloc(10, owner=2)
    ring.alloc(10, owner=3)
    assert ring.holds(3) and not ring.holds(2)
    ring.release(3)
    assert not ring.holds(3)
