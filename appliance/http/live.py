"""New events fanned out to the console's open pages, which receive them as server-sent events.

:meth:`LiveFeed.publish` may be called from any thread (the event sink on the loop, a console form in the
server's thread pool); the queues are only touched on the loop. Each open page holds one bounded queue. A page that stops reading loses its oldest undelivered events (it shows the
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
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the pages' streams run on
        self.closed = False

    @property
    def listeners(self) -> int:
        return len(self._queues)

    def publish(self, event: EventRecord) -> None:
        self._on_loop(event)

    def close(self) -> None:
        """The daemon is stopping: every open stream ends (``None``), so the server can stop at once."""
        self.closed = True
        self._on_loop(None)

    def _on_loop(self, item: EventRecord | None) -> None:
        loop = self._loop
        if loop is None:
            return  # no page has ever listened
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._put(item)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: EventRecord | None) -> None:
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(item)

    @contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[EventRecord | None]]:
        self._loop = asyncio.get_running_loop()
        q: asyncio.Queue[EventRecord | None] = asyncio.Queue(QUEUE_PER_PAGE)
        if self.closed:
            q.put_nowait(None)
        self._queues.add(q)
        try:
            yield q
        finally:
            self._queues.discard(q)
