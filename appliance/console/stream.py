"""``/alerts/stream``: new alerts as server-sent events, each an HTML row in the reader's language.

The page's script (``static/console.js``) puts each row at the top of the list; a browser that loses
the connection reconnects by itself (``retry``). A comment every ``KEEPALIVE_S`` keeps proxies and
the browser from giving up on a quiet line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from appliance.console.web import PageViewer, localizer, render_fragment
from appliance.http.security import console, csrf_token

router = APIRouter(include_in_schema=False)

KEEPALIVE_S = 15.0
RETRY_MS = 3000


@router.get("/alerts/stream")
async def stream(who: PageViewer, request: Request) -> StreamingResponse:
    ctx = console(request)
    loc = localizer(request, who)
    can_handle = who.allows("operator")
    csrf = csrf_token(who)

    async def events() -> AsyncIterator[str]:
        with ctx.live.subscribe() as queue:
            yield f"retry: {RETRY_MS}\n: connected\n\n"
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    yield ": keep-alive\n\n"
                    continue
                if event is None:
                    return  # the daemon is stopping
                html = render_fragment("alert_row.html", loc, item=(event, []), can_handle=can_handle, csrf=csrf,
                                       back_to=None)
                payload = json.dumps({"id": event.id, "source": event.source, "app": event.app,
                                      "label": event.label, "html": html})
                yield f"event: alert\nid: {event.id}\ndata: {payload}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})
