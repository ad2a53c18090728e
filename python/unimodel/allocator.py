"""Allocator for the output arena: 64-byte-aligned blocks, each owned by one execute id.

The worker allocates one block per result (or stream chunk) and the core sends
``release(id)`` once it has copied that result or chunk; ``release`` frees exactly the block
of that id (protocol v2: a worker running many requests answers them in any order, so blocks
are freed in any order). An id owns at most one block at a time: a result is one block, and a
stream writes its next chunk only once the previous one is released. Allocation is first fit
over a sorted free list whose neighbours are merged on free, the same rule as the core's
input arena (``core/src/worker/arena.rs``).
"""

from __future__ import annotations

import bisect

ALIGN = 64


def align_up(n: int) -> int:
    """`n` rounded up to the next multiple of `ALIGN`."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class OutputArena:
    """First-fit blocks over `capacity` bytes, freed by owner id.

    Not thread-safe: only the worker's control thread (or event loop) allocates and frees.
    """

    def __init__(self, capacity: int) -> None:
        # Only whole aligned blocks can be handed out.
        self.capacity = capacity & ~(ALIGN - 1)
        #: Free ranges sorted by start: parallel lists of starts and ends, never adjacent.
        self._starts: list[int] = [0] if self.capacity else []
        self._ends: list[int] = [self.capacity] if self.capacity else []
        #: Live blocks: owner id -> (start, end).
        self._live: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def alloc(self, size: int, owner: int) -> int | None:
        """Offset of a new block of at least `size` bytes owned by execute `owner`.

        None when it does not fit now (wait for a release); callers check `size <= capacity`
        first, since a larger block never fits.
        """
        if owner in self._live:
            raise ValueError(f"execute {owner} already holds an output block")
        size = align_up(max(size, 1))
        starts, ends = self._starts, self._ends
        for i, start in enumerate(starts):
            if ends[i] - start >= size:
                if ends[i] - start == size:
                    del starts[i], ends[i]
                else:
                    starts[i] = start + size
                self._live[owner] = (start, start + size)
                return start
        return None

    def release(self, owner: int) -> bool:
        """Frees the block of execute `owner`; False if it holds none (a stream's end, a
        result in dedicated regions or client memory)."""
        block = self._live.pop(owner, None)
        if block is None:
            return False
        start, end = block
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(starts, start)
        merge_before = i > 0 and ends[i - 1] == start
        merge_after = i < len(starts) and starts[i] == end
        if merge_before and merge_after:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif merge_before:
            ends[i - 1] = end
        elif merge_after:
            starts[i] = start
        else:
            starts.insert(i, start)
            ends.insert(i, end)
        return True

    def holds(self, owner: int) -> bool:
        """True while execute `owner` has a live block (a stream's last chunk, unreleased)."""
        return owner in self._live

    def used(self) -> int:
        """Bytes in live blocks."""
        return sum(end - start for start, end in self._live.values())
