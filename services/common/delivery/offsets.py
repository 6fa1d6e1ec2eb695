"""Which offset of a partition may be committed when records finish out of order."""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    """Offsets handed out in order, finished in any order; commit only below the lowest unfinished one."""

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._done: dict[int, bool] = {}
        self._next: int | None = None  # one past the last offset seen

    def add(self, offset: int) -> None:
        if self._next is not None and offset < self._next:
            return  # fetched again after a seek: already tracked or already committed past
        self._order.append(offset)
        self._done[offset] = False
        self._next = offset + 1

    def done(self, offset: int) -> None:
        if offset in self._done:
            self._done[offset] = True
        while self._order and self._done[self._order[0]]:
            del self._done[self._order.popleft()]

    def committable(self) -> int | None:
        """The offset to commit (the next record to read after a restart), or None if nothing was seen."""
        if self._order:
            return self._order[0]
        return self._next

    @property
    def pending(self) -> int:
        return len(self._order)
