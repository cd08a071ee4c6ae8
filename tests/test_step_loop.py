"""actors.model: the step loop runs on its own thread and does not wait for the event loop,
but it never runs more than MAX_AHEAD steps ahead of the sinks."""

from __future__ import annotations

import time

import pytest

import actors.model
from runtime import Runtime
from tests.helpers import PROMPTS, greedy, open_runtime, wait_until

STEP_S = 0.004
BLOCK_S = 0.12


async def steps_while_the_event_loop_is_held(rt: Runtime) -> tuple[int, int]:
    """Start 2 long requests, hold the event loop for BLOCK_S (as a slow HTTP write would) and
    return (steps decoded meanwhile, steps handed to the sinks meanwhile)."""
    streams = [rt.generate(greedy(p, max_tokens=200)) for p in PROMPTS[:2]]
    for stream in streams:
        await stream.__anext__()  # both decode now
    await wait_until(lambda: rt.statistics().model.last_step_sequences == 2)
    delivered: list[int] = []

    class Deliveries:
        def step(self, report: object) -> None:
            delivered.append(1)

    rt.observers.add(Deliveries())
    before = rt.statistics().model.steps
    time.sleep(BLOCK_S)  # noqa: ASYNC251 (the point: the event loop is held, no callback runs)
    during = rt.statistics().model.steps - before
    sent_during = len(delivered)
    for stream in streams:
        await stream.aclose()
    return during, sent_during


async def test_the_steps_go_on_while_the_event_loop_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actors.model, "MAX_AHEAD", 10_000)
    async with open_runtime("fake", slots=2, fake={"step_delay_s": STEP_S}) as rt:
        during, _ = await steps_while_the_event_loop_is_held(rt)
    assert during >= 5  # in 30 steps' time (fewer on a loaded machine); a loop-driven step would do 1


async def test_the_steps_wait_for_the_sinks_past_max_ahead() -> None:
    async with open_runtime("fake", slots=2, fake={"step_delay_s": STEP_S}) as rt:
        during, sent = await steps_while_the_event_loop_is_held(rt)
        want = await rt.complete(greedy(PROMPTS[0], max_tokens=20))
        again = await rt.complete(greedy(PROMPTS[0], max_tokens=20))
    assert during <= actors.model.MAX_AHEAD + 1  # the one in flight, then MAX_AHEAD queued
    assert sent == 0  # the tokens waited for the event loop
    assert again.token_ids == want.token_ids  # and the runtime serves on
