"""Guard rails for every test: warnings are errors (pyproject), a per-test timeout
(pytest-timeout), and no callback may hold the event loop for long (asyncio debug mode,
the way anyio checks its own tests). A garbage-collector pause is not a blocking call: the
time the collector ran inside a slow callback is not counted against it."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import pytest

SLOW_CALLBACK_S = 0.25
"""A callback that holds the event loop longer than this fails the test: something blocked."""


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
    """asyncio's slow-callback warnings, less the collector's share of each."""

    def __init__(self, gc_pauses: _GcPauses) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._gc = gc_pauses

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not (message.startswith("Executing") and " took " in message):
            return
        took = record.args[-1] if isinstance(record.args, tuple) else SLOW_CALLBACK_S
        assert isinstance(took, float)
        end = time.perf_counter()
        collected = self._gc.within(end - took - 0.01, end)
        if took - collected >= SLOW_CALLBACK_S:
            self.messages.append(f"{message} ({collected:.3f} s of it in the garbage collector)")


@pytest.fixture
async def loop_watch() -> AsyncIterator[None]:
    """Run the test's event loop in debug mode and fail on any slow callback."""
    loop = asyncio.get_running_loop()
    gc_pauses = _GcPauses()
    handler = _SlowCallbacks(gc_pauses)
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    gc.callbacks.append(gc_pauses)
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_S
    try:
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
