"""New events fanned out to the console's open pages, which receive them as server-sent events.

Runs on the daemon's event loop: :meth:`LiveFeed.publish` is called by the event sink, each open page
holds one bounded queue. A page that stops reading loses its oldest undelivered events (it shows the
full list again on reload), never the daemon's memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from appliance.store import EventRecord

QUEUE_PER_PAGE = 100


class LiveFeed:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[EventRecord | None]] = set()
        self.closed = False

    @property
    def listeners(self) -> int:
        return len(self._queues)

    def publish(self, event: EventRecord) -> None:
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(event)

    def close(self) -> None:
        """The daemon is stopping: every open stream ends (``None``), so the server can stop at once."""
        self.closed = True
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)

    @contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[EventRecord | None]]:
        q: asyncio.Queue[EventRecord | None] = asyncio.Queue(QUEUE_PER_PAGE)
        if self.closed:
            q.put_nowait(None)
        self._queues.add(q)
        try:
            yield q
        finally:
            self._queues.discard(q)
