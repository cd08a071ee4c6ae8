"""Guard rails for every test: warnings are errors (pyproject), a per-test timeout
(pytest-timeout), and no callback may hold the event loop for long (asyncio debug mode,
the way anyio checks its own tests)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

SLOW_CALLBACK_S = 0.25
"""A callback that holds the event loop longer than this fails the test: something blocked."""


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing") and " took " in message:
            self.messages.append(message)


@pytest.fixture
async def loop_watch() -> AsyncIterator[None]:
    """Run the test's event loop in debug mode and fail on any slow callback."""
    loop = asyncio.get_running_loop()
    handler = _SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_S
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, f"the event loop was blocked: {handler.messages}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every async test gets ``loop_watch``."""
    for item in items:
        if isinstance(item, pytest.Function) and asyncio.iscoroutinefunction(item.function):
            item.fixturenames.append("loop_watch")
