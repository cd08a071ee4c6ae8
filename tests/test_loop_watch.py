"""The event-loop watchdog every async test runs under (tests/conftest.py): work on the CPU
past its limit fails, a blocking call past the longer limit fails, and a wait between the two
(the thread asleep, as when the machine is busy elsewhere) does not."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.conftest import SLOW_CALLBACK_S, STALLED_CALLBACK_S, _CallbackCpu, _GcPauses, _SlowCallbacks


def _reported(block: float, *, spin: bool) -> list[str]:
    """What the watchdog reports of one callback that spins (or sleeps) ``block`` seconds."""

    async def blocking() -> None:
        if spin:
            end = time.thread_time() + block
            while time.thread_time() < end:
                pass
        else:
            time.sleep(block)  # noqa: ASYNC251 - the blocking call under test

    cpu = _CallbackCpu()
    handler = _SlowCallbacks(_GcPauses(), cpu)
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_S
    try:
        with cpu:
            loop.run_until_complete(blocking())
    finally:
        loop.close()
        logger.removeHandler(handler)
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


def test_the_wrapped_callback_is_put_back() -> None:
    original = asyncio.events.Handle._run
    with _CallbackCpu():
        assert asyncio.events.Handle._run is not original
    assert asyncio.events.Handle._run is original
