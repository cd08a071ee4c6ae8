"""actors.worker: the ModelActor's one worker thread."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from actors.worker import WorkerThread


async def test_calls_run_in_order_on_one_thread_off_the_event_loop() -> None:
    worker = WorkerThread("test-worker")
    seen: list[tuple[int, int]] = []

    def call(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * 10

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(worker.run_sync, call, i)
    assert sorted(i for i, _ in seen) == list(range(5))
    threads = {t for _, t in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert await worker.run_sync(call, 7) == 70
    assert worker.busy == 0


async def test_an_error_in_the_call_is_raised_to_the_caller() -> None:
    worker = WorkerThread("test-worker")

    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await worker.run_sync(fail)
    assert await worker.run_sync(lambda: 1) == 1  # the thread goes on


async def test_a_cancelled_caller_waits_for_the_call_to_end() -> None:
    worker = WorkerThread("test-worker")
    ended: list[float] = []

    def slow() -> None:
        time.sleep(0.2)
        ended.append(time.monotonic())

    with anyio.move_on_after(0.02) as scope:
        await worker.run_sync(slow)
    assert scope.cancelled_caught
    assert ended, "the cancelled caller returned before the call ended"
    assert worker.busy == 0
