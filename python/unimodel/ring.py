"""Allocator for the output arena: a ring of 64-byte-aligned blocks freed in allocation order.

The worker allocates one block per result (or stream chunk); the core copies the tensors out
and sends ``release(id)``, which frees every block of results with id <= `id`. An allocation
that does not fit between the head and the end of the arena wraps to offset 0 if it fits
before the oldest live block; the gap left at the end is reclaimed when that block is freed.
"""

from __future__ import annotations

from collections import deque

ALIGN = 64


def align_up(n: int) -> int:
    """`n` rounded up to the next multiple of `ALIGN`."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class OutputRing:
    """Ring allocation over `capacity` bytes. Not thread-safe (the worker is single-threaded)."""

    def __init__(self, capacity: int) -> None:
        # Only whole aligned blocks can be handed out.
        self.capacity = capacity & ~(ALIGN - 1)
        #: Live blocks in allocation order: (id, start, end).
        self._blocks: deque[tuple[int, int, int]] = deque()
        #: Where the next block starts when it fits.
        self._head = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def alloc(self, size: int, owner: int) -> int | None:
        """Offset of a new block of at least `size` bytes owned by result `owner`.

        None when it does not fit now (wait for a release); callers check `size <= capacity`
        first, since a larger block never fits.
        """
        size = align_up(max(size, 1))
        blocks = self._blocks
        if not blocks:
            if size > self.capacity:
                return None
            start = 0
        else:
            oldest = blocks[0][1]
            head = self._head
            if head > oldest:
                # Live region is [oldest, head): free space at the end, then before `oldest`.
                if head + size <= self.capacity:
                    start = head
                elif size <= oldest:
                    start = 0
                else:
                    return None
            elif head < oldest:
                # Wrapped: live region is [oldest, end) and [0, head); free is [head, oldest).
                if head + size <= oldest:
                    start = head
                else:
                    return None
            else:
                # head == oldest with live blocks: the wrapped ring is exactly full.
                return None
        blocks.append((owner, start, start + size))
        self._head = start + size
        return start

    def release(self, up_to: int) -> int:
        """Frees, in order, blocks owned by results with id <= `up_to`; returns how many."""
        blocks = self._blocks
        freed = 0
        while blocks and blocks[0][0] <= up_to:
            blocks.popleft()
            freed += 1
        if not blocks:
            self._head = 0
        return freed

    def holds(self, owner: int) -> bool:
        """True while the newest live block belongs to result `owner` (a stream's last chunk)."""
        return bool(self._blocks) and self._blocks[-1][0] == owner

    def used(self) -> int:
        """Bytes between the oldest live block and the head (gaps included)."""
        if not self._blocks:
            return 0
        oldest = self._blocks[0][1]
        if self._head > oldest:
            return self._head - oldest
        return self.capacity - oldest + self._head
