"""The two ways across the loop/thread boundary (appliance.tasks), on a real event loop and real threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from appliance.tasks import in_daemon_thread, threadsafe


def test_loop_code_called_from_a_thread_runs_on_the_loop_and_returns_or_raises() -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()

        def answer() -> int:
            assert threading.get_ident() == loop_thread, "runs on the loop, not on the calling thread"
            return 42

        def fails() -> int:
            raise ValueError("from the loop")

        answer_, fails_ = threadsafe(answer), threadsafe(fails)  # wrapped on the loop

        def caller() -> tuple[int, str]:
            try:
                fails_()
            except ValueError as e:
                return answer_(), str(e)
            return answer_(), ""

        assert await in_daemon_thread(caller, "test-caller") == (42, "from the loop")

    asyncio.run(main())


def test_blocking_code_runs_on_a_daemon_thread_and_its_error_reaches_the_awaiting_task() -> None:
    async def main() -> None:
        seen: list[threading.Thread] = []

        def work() -> str:
            seen.append(threading.current_thread())
            return "done"

        assert await in_daemon_thread(work, "test-worker") == "done"
        assert seen[0].daemon and seen[0].name == "test-worker" and seen[0] is not threading.main_thread()

        def broken() -> None:
            raise OSError("the link dropped")

        with pytest.raises(OSError, match="the link dropped"):
            await in_daemon_thread(broken, "test-worker")

    asyncio.run(main())
