"""Latest-wins slots with fair, round-robin service across sources.

Each source holds at most ``capacity`` pending items (1 for cameras: the newest frame wins). A new
item beyond that pushes out the oldest, which is returned so the caller can count it as skipped.
Sources are served in the order they became ready and go to the back after each item, so one busy
source cannot starve the others. Memory is bounded by sources x capacity. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlots(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, deque[T]] = {}
        self._ready: OrderedDict[str, None] = OrderedDict()

    def put(self, source: str, item: T, capacity: int = 1) -> T | None:
        """Store ``item``; returns the item it displaced, if any."""
        with self._lock:
            q = self._pending.get(source)
            if q is None or q.maxlen != capacity:
                q = self._pending[source] = deque(q or (), maxlen=capacity)
            dropped = q[0] if len(q) == capacity else None
            q.append(item)
            if source not in self._ready:
                self._ready[source] = None
            return dropped

    def take(self) -> tuple[str, T] | None:
        """The next item in round-robin order, or None when nothing is pending."""
        with self._lock:
            while self._ready:
                source, _ = self._ready.popitem(last=False)
                q = self._pending.get(source)
                if not q:
                    continue
                item = q.popleft()
                if q:
                    self._ready[source] = None
                return source, item
            return None

    def drop(self, source: str) -> list[T]:
        """Remove a source's pending items (e.g. when no app listens to it any more)."""
        with self._lock:
            self._ready.pop(source, None)
            q = self._pending.pop(source, None)
            return list(q or ())

    def __len__(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._pending.values())
