"""Small asyncio helpers shared by the long-lived components, and the two ways across the boundary
between the daemon's loop and the threads that block (the AppStore sync's downloads, paho's callbacks):

- :func:`threadsafe`: loop code made callable from a thread, which waits for its result;
- :func:`in_daemon_thread`: blocking code run from the loop on a thread of its own, awaited.

Everything else that crosses is fire-and-forget and uses ``loop.call_soon_threadsafe`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
THREADSAFE_TIMEOUT_S = 10.0  # a call from another thread onto the loop gives up after this


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait until it has finished unwinding (no-op for None)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def threadsafe(fn: Callable[[], T], loop: asyncio.AbstractEventLoop | None = None,
               timeout_s: float = THREADSAFE_TIMEOUT_S) -> Callable[[], T]:
    """``fn``, callable from any other thread: each call runs it on ``loop`` (by default the one running
    here, so wrap on the loop) and waits up to ``timeout_s`` for its result or its exception."""
    target = loop or asyncio.get_running_loop()

    async def call() -> T:
        return fn()

    def from_thread() -> T:
        return asyncio.run_coroutine_threadsafe(call(), target).result(timeout_s)

    return from_thread


def in_daemon_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run blocking ``fn`` on a new daemon thread; the future (on the running loop) settles with its result.

    Unlike ``asyncio.to_thread``, a daemon thread is never waited for when the daemon stops (a download
    may be mid-way); cancelling the future only stops waiting for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the awaiting task was cancelled (the daemon is stopping)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon stopped meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future
