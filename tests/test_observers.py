"""Observers are isolated: one that raises, in any event, is logged once with its name and the
event, and nothing else changes (the requests, their slots, the runtime, the other observers)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from runtime import QueueFullError, SlotFailedError
from runtime.core.events import EVENTS, Observers
from tests.helpers import greedy, open_runtime, wait_until


class Recorder:
    """Counts every event; raises in ``failing`` (if any)."""

    def __init__(self, failing: str | None = None) -> None:
        self.failing = failing
        self.calls: dict[str, int] = dict.fromkeys(EVENTS, 0)

    def _seen(self, event: str) -> None:
        self.calls[event] += 1
        if event == self.failing:
            raise RuntimeError(f"a bug in the observer's {event}")

    def request_admitted(self) -> None:
        self._seen("request_admitted")

    def request_rejected(self, reason: Any) -> None:
        self._seen("request_rejected")

    def request_started(self, priority: str, tenant: str, wait_s: float, error_s: float | None) -> None:
        self._seen("request_started")

    def request_finished(self, reason: Any, stats: Any, error: Any) -> None:
        self._seen("request_finished")

    def inter_token(self, seconds: float) -> None:
        self._seen("inter_token")

    def step(self, report: Any) -> None:
        self._seen("step")

    def restart(self, actor: Any) -> None:
        self._seen("restart")

    def resize(self, direction: Any, reason: Any, pause_s: float) -> None:
        self._seen("resize")

    def resize_failed(self, direction: Any, reason: Any) -> None:
        self._seen("resize_failed")

    def embedding_batch(self, report: Any) -> None:
        self._seen("embedding_batch")

    def embedding_finished(self, inputs: int, tokens: int, error: Any) -> None:
        self._seen("embedding_finished")


async def _every_event(event: str | None) -> tuple[list[int], Recorder, Recorder]:
    """A runtime whose observers see every event: requests, a refusal, a crash (restart), a
    resize and one that fails. One observer raises in ``event``; the other is sound. Returns the
    requests' token counts and both observers."""
    failing, witness = Recorder(event), Recorder()
    fake = {"fault_prompts": ["boom"], "fault_after": 1, "step_delay_s": 0.002, "resize_fails_above": 2}
    async with open_runtime("fake", slots=1, max_queue=1, fake=fake, restart_backoff_s=0.0) as rt:
        rt.observers.add(failing)
        rt.observers.add(witness)
        counts = [(await rt.complete(greedy(p, max_tokens=12))).stats.completion_tokens for p in ("ab", "cd")]
        first = rt.generate(greedy("ef", max_tokens=40))
        await wait_until(lambda: rt.status().slots_busy == 1)
        queued = rt.generate(greedy("gh", max_tokens=5))
        with pytest.raises(QueueFullError):
            rt.generate(greedy("ij", max_tokens=5))
        counts += [
            (await first.collect()).stats.completion_tokens,
            (await queued.collect()).stats.completion_tokens,
        ]
        with pytest.raises(SlotFailedError):  # crashes twice: retried once, then failed
            await rt.complete(greedy("boom", max_tokens=5))
        await rt.resize(2)
        failed = await rt.resize(3)  # the fake builds no context above 2
        assert failed is not None and failed.error is not None
        counts.append((await rt.complete(greedy("kl", max_tokens=7))).stats.completion_tokens)
        embedded = await rt.embed(["ab", "cd"])
        assert embedded.input_tokens == [2, 2] and len(embedded.vectors) == 2
        status = rt.status()
        assert status.state == "ready" and status.requests_in_flight == 0 and status.slots_busy == 0
        assert status.slots_effective == 2
    return counts, failing, witness


@pytest.mark.parametrize("event", EVENTS)
async def test_an_observer_that_raises_changes_nothing_else(
    event: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="slotserve.events"):
        counts, failing, witness = await _every_event(event)
    assert counts == [12, 12, 40, 5, 7]
    assert failing.calls == witness.calls  # called for every event, as often as the sound one
    assert witness.calls[event] >= 1
    logged = [r for r in caplog.records if r.name == "slotserve.events"]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "Recorder" in logged[0].getMessage() and event in logged[0].getMessage()
    assert logged[0].exc_info is not None


async def test_a_sound_run_sees_every_event_once_or_more() -> None:
    """The scenario above reaches every event (else the parametrised test proves less)."""
    counts, _, witness = await _every_event(None)
    assert counts == [12, 12, 40, 5, 7]
    assert all(n >= 1 for n in witness.calls.values()), witness.calls
    assert (
        witness.calls["request_rejected"] == 1
        and witness.calls["resize"] == witness.calls["resize_failed"] == 1
    )
    assert witness.calls["request_finished"] == witness.calls["request_admitted"] == 6


def test_observers_calls_each_handler_and_skips_a_raising_one() -> None:
    a, b = Recorder("step"), Recorder()
    fan = Observers(a, b)
    for _ in range(3):
        fan.step(None)  # type: ignore[arg-type]
        fan.inter_token(0.01)
    assert a.calls["step"] == b.calls["step"] == 3
    assert b.calls["inter_token"] == 3


def test_an_observers_inside_another_is_flattened_and_follows_later_adds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two models' Observers hold their Runtime's: an observer added to it later is called by
    both, once per event, after those added before it; one that raises is logged once."""
    order: list[str] = []

    class Named(Recorder):
        def __init__(self, name: str, failing: str | None = None) -> None:
            super().__init__(failing)
            self.name = name

        def step(self, report: Any) -> None:
            order.append(self.name)

    runtime_fan, first = Observers(), Named("first")
    runtime_fan.add(first)
    models = [Observers(runtime_fan), Observers(runtime_fan)]
    late, failing = Named("late"), Named("failing", "inter_token")
    runtime_fan.add(late)
    runtime_fan.add(failing)
    with caplog.at_level(logging.ERROR, logger="slotserve.events"):
        for fan in models:
            fan.inter_token(0.01)
            fan.step(None)  # type: ignore[arg-type]
    assert first.calls["inter_token"] == late.calls["inter_token"] == failing.calls["inter_token"] == 2
    assert order == ["first", "late", "failing"] * 2
    assert len([r for r in caplog.records if r.name == "slotserve.events"]) == 1
