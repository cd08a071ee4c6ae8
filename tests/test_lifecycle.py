"""Every admitted request ends exactly once, whatever the runtime does meanwhile: closes with a
request waiting for room, fails while a slot tokenizes, closes while a crashed request waits for
its retry. (Found by a review of the finish path; each failed before it was fixed.)"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from runtime import GenerateRequest, Runtime, RuntimeConfig
from runtime.backends.fake import FakeBackend
from tests.helpers import greedy, open_runtime, wait_until


class Ends:
    """Counts request_finished events by (done_reason, error type)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def request_finished(self, reason: str, stats: Any, error: BaseException | None) -> None:
        self.seen.append((reason, type(error).__name__))

    def request_rejected(self, reason: str) -> None:
        self.seen.append(("rejected", reason))


async def _read(stream: Any, out: list[str]) -> None:
    try:
        async for _ in stream:
            pass
        out.append("ended")
    except Exception as exc:
        out.append(type(exc).__name__)


async def test_closing_with_a_request_waiting_for_room_ends_it_once_and_promptly() -> None:
    ends, result = Ends(), list[str]()
    async with anyio.create_task_group() as tg:
        async with open_runtime("fake", slots=1, max_queue=1, fake={"step_delay_s": 0.01}) as rt:
            rt.observers.add(ends)
            running = rt.generate(greedy("a", max_tokens=400))
            await wait_until(lambda: rt.status().slots_busy == 1)
            queued = rt.generate(greedy("b", max_tokens=4))
            waiting = rt.generate(greedy("c", max_tokens=4), admission_timeout_s=30)
            tg.start_soon(_read, waiting, result)
            await anyio.sleep(0.05)  # it waits for room in the mailbox now
            closing = time.perf_counter()
        closed_s = time.perf_counter() - closing
        status = rt.status()
        del running, queued
    assert result == ["RuntimeClosedError"]
    assert status.requests_in_flight == 0 and closed_s < 2.0
    # the queued one ends with the error; the one waiting for room is refused (never admitted)
    assert sorted(ends.seen) == [
        ("cancel", "NoneType"),
        ("error", "RuntimeClosedError"),
        ("rejected", "closed"),
    ]


class SlowTokenize(FakeBackend):
    """Tokenizing a prompt that says "slow" takes 0.3 s (in a thread, as a slow tokenizer's)."""

    inline_tokenize = False

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        if "slow" in text:
            time.sleep(0.3)
        return super().tokenize(text, add_special=add_special, parse_special=parse_special)


async def test_a_failed_runtime_ends_the_request_a_slot_was_tokenizing() -> None:
    cfg = RuntimeConfig(backend="fake", slots=2, n_ctx_per_slot=512, restart_intensity=0)
    backend = SlowTokenize(n_seq_max=2, n_ctx_per_slot=512, step_delay_s=0.005)
    ends, result = Ends(), list[str]()
    async with anyio.create_task_group() as tg, Runtime(cfg, backend=backend, observers=[ends]) as rt:
        first = rt.generate(GenerateRequest(prompt="a", max_tokens=200, temperature=0))
        tokenizing = rt.generate(GenerateRequest(prompt="slow", max_tokens=5, temperature=0))
        tg.start_soon(_read, tokenizing, result)
        await anyio.sleep(0.05)
        backend.fail_next_steps = 1  # the step fails; restart_intensity 0: the runtime fails
        with pytest.raises(Exception, match="step failed"):
            await first.collect()
        await wait_until(lambda: bool(result), timeout_s=3)
        await wait_until(lambda: rt.status().slots_busy == 0, timeout_s=3)
        status = rt.status()
    assert result == ["RuntimeFailedError"]  # not a hang until the runtime closes
    assert status.state == "failed" and status.requests_in_flight == 0
    assert len(ends.seen) == 2 and ("error", "RuntimeFailedError") in ends.seen


async def test_closing_while_a_crashed_request_waits_for_its_retry_ends_it() -> None:
    ends, result = Ends(), list[str]()
    fake = {"fault_prompts": ["boom"], "fault_after": 1}
    async with anyio.create_task_group() as tg:
        async with open_runtime(
            "fake", slots=1, restart_backoff_s=12, restart_backoff_max_s=12, fake=fake
        ) as rt:
            rt.observers.add(ends)
            stream = rt.generate(greedy("boom", max_tokens=4))
            tg.start_soon(_read, stream, result)
            await wait_until(lambda: rt.status().restarts == 1)  # its retry waits 6-12 s of backoff
        status = rt.status()
    assert result == ["RuntimeClosedError"] and status.requests_in_flight == 0
    assert ends.seen == [("error", "RuntimeClosedError")]
