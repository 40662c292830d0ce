"""The console's live feed: an alert published from the server's thread pool (a form) reaches open pages."""

from __future__ import annotations

import asyncio
import threading

from appliance.http.live import LiveFeed
from appliance.store import EventRecord


def test_an_event_published_from_another_thread_reaches_an_open_page() -> None:
    feed = LiveFeed()
    event = EventRecord("e1", 1.0, "(reported)", "cam1", "reported by an operator", "missed", 0.0)

    async def page() -> EventRecord | None:
        with feed.subscribe() as queue:
            threading.Thread(target=feed.publish, args=(event,)).start()  # as a form's route does
            return await asyncio.wait_for(queue.get(), 10)

    assert asyncio.run(page()) == event


def test_closing_ends_the_open_streams() -> None:
    feed = LiveFeed()

    async def page() -> EventRecord | None:
        with feed.subscribe() as queue:
            feed.close()
            return await asyncio.wait_for(queue.get(), 10)

    assert asyncio.run(page()) is None
