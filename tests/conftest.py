"""Guard rails for every test: warnings are errors (pyproject), a per-test timeout
(pytest-timeout), and no callback may hold the event loop for long (asyncio debug mode,
the way anyio checks its own tests).

A callback fails the test when it ran on the CPU for SLOW_CALLBACK_S (work that belongs off
the loop), or held the loop for STALLED_CALLBACK_S in all (a blocking call). Below that, time
the loop thread did not run is not counted: a thread kept waiting by a machine busy with other
work is not a blocking call (pauses of 0.28 and 0.39 s were seen on 2 shared cores, in
callbacks that take 4 ms alone). Nor is a garbage-collector pause: the time the collector ran
inside a slow callback is not counted against it."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

import pytest

SLOW_CALLBACK_S = 0.25
"""A callback that runs on the CPU this long fails the test: something blocked the loop."""

STALLED_CALLBACK_S = 1.0
"""A callback that holds the event loop this long, running or not, fails the test."""


class _LastCallback:
    """When the callback that last ran on the current thread's event loop started and ended
    (perf_counter) and its CPU time: asyncio's ``Handle._run``, wrapped while a test runs.
    asyncio reports a slow callback right after it ran, on the same thread."""

    def __init__(self) -> None:
        self._original = asyncio.events.Handle._run
        self._last = threading.local()

    def get(self) -> tuple[float, float, float] | None:
        """(started, ended, cpu seconds) of the last callback of asyncio's own that ran here
        (uvloop's are not timed); None if none did."""
        return getattr(self._last, "timing", None)

    def __enter__(self) -> None:
        run, last = self._original, self._last

        def timed(handle: asyncio.events.Handle) -> None:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                run(handle)
            finally:
                last.timing = (started, time.perf_counter(), time.thread_time() - cpu)

        asyncio.events.Handle._run = timed  # type: ignore[method-assign, assignment]

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]


class _GcPauses:
    """The recent collector runs, as (start, end) on the perf_counter clock (a gc callback)."""

    def __init__(self) -> None:
        self.runs: deque[tuple[float, float]] = deque(maxlen=1024)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.runs.append((self._started, time.perf_counter()))

    def within(self, start: float, end: float) -> float:
        """Seconds the collector ran between ``start`` and ``end``."""
        return sum(max(0.0, min(e, end) - max(s, start)) for s, e in self.runs)


class _SlowCallbacks(logging.Handler):
    """asyncio's slow-callback warnings of callbacks that blocked, less the collector's share."""

    def __init__(self, gc_pauses: _GcPauses, last: _LastCallback) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._gc = gc_pauses
        self._last = last

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not (message.startswith("Executing") and " took " in message):
            return
        took = record.args[-1] if isinstance(record.args, tuple) else SLOW_CALLBACK_S
        assert isinstance(took, float)
        timing = self._last.get()
        if timing is None or abs(timing[1] - timing[0] - took) > 0.1:
            # not timed, or the timing is another callback's (uvloop's are not asyncio's
            # Handle._run): all of it on the CPU, ending now
            end = time.perf_counter()
            timing = (end - took, end, took)
        started, ended, cpu = timing
        collected = self._gc.within(started, ended)
        if cpu - collected >= SLOW_CALLBACK_S or took - collected >= STALLED_CALLBACK_S:
            self.messages.append(
                f"{message} ({cpu:.3f} s of it on the CPU, {collected:.3f} s in the garbage collector)"
            )


@pytest.fixture
async def loop_watch() -> AsyncIterator[None]:
    """Run the test's event loop in debug mode and fail on any slow callback."""
    loop = asyncio.get_running_loop()
    gc_pauses = _GcPauses()
    last = _LastCallback()
    handler = _SlowCallbacks(gc_pauses, last)
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    gc.callbacks.append(gc_pauses)
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_S
    try:
        with last:
            yield
    finally:
        gc.callbacks.remove(gc_pauses)
        logger.removeHandler(handler)
    assert not handler.messages, f"the event loop was blocked: {handler.messages}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every async test gets ``loop_watch``."""
    for item in items:
        if isinstance(item, pytest.Function) and asyncio.iscoroutinefunction(item.function):
            item.fixturenames.append("loop_watch")
