"""The event-loop watchdog every async test runs under (tests/conftest.py): work on the CPU
past its limit fails, a blocking call past the longer limit fails, and a wait between the two
(the thread asleep, as when the machine is busy elsewhere) does not."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.conftest import SLOW_CALLBACK_S, STALLED_CALLBACK_S, _GcPauses, _LastCallback, _SlowCallbacks


class _SlowHandler(logging.Handler):
    """A handler ahead of the watchdog's that takes its time (the report comes later)."""

    def emit(self, record: logging.LogRecord) -> None:
        time.sleep(SLOW_CALLBACK_S + 0.05)


def _reported(block: float, *, spin: bool, collector: bool = False) -> list[str]:
    """What the watchdog reports of one callback that spins (or sleeps) ``block`` seconds, as
    the garbage collector's pause with ``collector`` (reported late, after a slow handler)."""
    pauses = _GcPauses()

    async def blocking() -> None:
        if collector:
            pauses("start", {})
        if spin:
            end = time.thread_time() + block
            while time.thread_time() < end:
                pass
        else:
            time.sleep(block)  # noqa: ASYNC251 - the blocking call under test
        if collector:
            pauses("stop", {})

    last = _LastCallback()
    handler = _SlowCallbacks(pauses, last)
    logger = logging.getLogger("asyncio")
    ahead = _SlowHandler() if collector else None
    if ahead is not None:
        logger.addHandler(ahead)
    logger.addHandler(handler)
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_S
    try:
        with last:
            loop.run_until_complete(blocking())
    finally:
        loop.close()
        logger.removeHandler(handler)
        if ahead is not None:
            logger.removeHandler(ahead)
    return handler.messages


@pytest.mark.parametrize(
    ("block", "spin", "fails"),
    [
        (SLOW_CALLBACK_S + 0.05, True, True),
        (SLOW_CALLBACK_S + 0.05, False, False),
        (STALLED_CALLBACK_S + 0.05, False, True),
        (SLOW_CALLBACK_S / 2, True, False),
    ],
    ids=["cpu-past-the-limit", "asleep-past-the-cpu-limit", "asleep-past-the-stall-limit", "cpu-within"],
)
def test_the_watchdog_fails_work_on_the_loop_and_long_blocking_calls_only(
    block: float, spin: bool, fails: bool
) -> None:
    messages = _reported(block, spin=spin)
    assert bool(messages) == fails, messages
    if fails:
        (message,) = messages
        assert "on the CPU" in message and "blocking()" in message


def test_a_collector_pause_is_not_counted_however_long_the_report_takes() -> None:
    assert _reported(SLOW_CALLBACK_S + 0.1, spin=True, collector=True) == []


def test_the_wrapped_callback_is_put_back() -> None:
    original = asyncio.events.Handle._run
    with _LastCallback():
        assert asyncio.events.Handle._run is not original
    assert asyncio.events.Handle._run is original


def test_a_callback_asyncio_did_not_time_is_not_judged_by_the_last_one_it_did() -> None:
    """uvloop runs its callbacks without asyncio's Handle._run, on a thread whose last timing
    is then another callback's (here a quick one of asyncio's own)."""
    uvloop = pytest.importorskip("uvloop")

    async def spin() -> None:
        end = time.thread_time() + SLOW_CALLBACK_S + 0.05
        while time.thread_time() < end:
            pass

    last = _LastCallback()
    handler = _SlowCallbacks(_GcPauses(), last)
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        with last:
            asyncio.run(asyncio.sleep(0))  # timed: a quick callback of asyncio's
            loop = uvloop.new_event_loop()
            loop.set_debug(True)
            loop.slow_callback_duration = SLOW_CALLBACK_S
            try:
                loop.run_until_complete(spin())
            finally:
                loop.close()
    finally:
        logger.removeHandler(handler)
    assert len(handler.messages) == 1 and "spin()" in handler.messages[0], handler.messages
