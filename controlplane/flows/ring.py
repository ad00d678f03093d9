"""The flow server's ring: the last N entries (flows and lost-event records), in order.

Every entry gets a sequence number (0, 1, 2, ...); the ring keeps the newest ``capacity``
of them. Readers never hold the writer back: each remembers the next sequence number it
wants, and a reader that the writer has lapped learns how many entries it missed
(:class:`Lapped`) and goes on from the oldest one kept, which the server turns into a
lost-event record for that reader. Waiting for new entries is one shared future per batch
(no per-reader queue, no per-entry wakeup).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["FlowRing", "Lapped"]

T = TypeVar("T")


class Lapped(Exception):
    """The reader's next entry was overwritten: ``missed`` entries are gone, and the oldest
    kept is ``resume``."""

    def __init__(self, missed: int, resume: int) -> None:
        super().__init__(f"{missed} entries overwritten")
        self.missed = missed
        self.resume = resume


class FlowRing(Generic[T]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"ring capacity {capacity}: want at least 1")
        self.capacity = capacity
        self._slots: list[T | None] = [None] * capacity
        self._next = 0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def next_seq(self) -> int:
        """The sequence number the next entry will get (= entries ever written)."""
        return self._next

    @property
    def oldest_seq(self) -> int:
        return max(0, self._next - self.capacity)

    def __len__(self) -> int:
        return self._next - self.oldest_seq

    def push(self, entry: T) -> None:
        """Append (overwriting the oldest when full). Call :meth:`notify` after a batch."""
        self._slots[self._next % self.capacity] = entry
        self._next += 1

    def notify(self) -> None:
        """Wake the readers waiting for entries."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get(self, seq: int) -> T:
        """The entry ``seq``; raises :class:`Lapped` when it was overwritten, IndexError
        when it is not written yet."""
        if seq >= self._next:
            raise IndexError(seq)
        oldest = self.oldest_seq
        if seq < oldest:
            raise Lapped(oldest - seq, oldest)
        entry = self._slots[seq % self.capacity]
        assert entry is not None
        return entry

    def newest_first(self) -> Iterator[tuple[int, T]]:
        """The kept entries, newest first (a snapshot of the positions at the call: stop
        iterating before awaiting anything)."""
        for seq in range(self._next - 1, self.oldest_seq - 1, -1):
            entry = self._slots[seq % self.capacity]
            assert entry is not None
            yield seq, entry

    async def wait_beyond(self, seq: int) -> None:
        """Return once an entry with a sequence number ≥ ``seq`` exists."""
        while self._next <= seq:
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)
