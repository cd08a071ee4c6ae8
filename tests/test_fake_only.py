"""What only the fake backend can show: injected faults, thread discipline, exact scripts."""

from __future__ import annotations

import threading

import anyio
import pytest

from actors.prompt import INLINE_PROMPT_CHARS
from runtime import Completion, RuntimeClosedError, RuntimeFailedError, SlotFailedError
from runtime.core.events import Observers
from runtime.core.records import StepReport
from tests.helpers import PROMPTS, greedy, open_runtime


async def test_a_slot_fault_fails_only_its_request_and_the_slot_restarts() -> None:
    fake = {"fault_prompts": ["boom"], "step_delay_s": 0.001}
    async with open_runtime("fake", slots=4, restart_intensity=3, fake=fake) as rt:
        results: dict[str, object] = {}

        async def run(prompt: str) -> None:
            try:
                results[prompt] = await rt.complete(greedy(prompt, max_tokens=20))
            except SlotFailedError as exc:
                results[prompt] = exc

        async with anyio.create_task_group() as tg:
            for p in [*PROMPTS[:3], "boom"]:
                tg.start_soon(run, p)
        status = rt.status()
        again = await rt.complete(greedy(PROMPTS[4], max_tokens=5))
        slots = rt.statistics().supervisor
    assert isinstance(results["boom"], SlotFailedError)
    assert "injected fault" in str(results["boom"])
    for p in PROMPTS[:3]:
        done = results[p]
        assert isinstance(done, Completion) and done.done_reason == "length"
    assert status.restarts == 1 and status.requests_failed == 1 and status.state == "ready"
    assert again.stats.completion_tokens == 5
    assert slots.slot_restarts == 1 and slots.slots_effective == 4


async def test_too_many_faults_fail_the_runtime() -> None:
    fake = {"fault_prompts": ["boom"]}
    async with open_runtime("fake", slots=1, max_queue=8, restart_intensity=2, fake=fake) as rt:
        streams = [rt.generate(greedy("boom", max_tokens=5)) for _ in range(3)]
        queued = rt.generate(greedy(PROMPTS[0], max_tokens=5))
        for s in streams:
            with pytest.raises(SlotFailedError):
                await s.collect()
        with pytest.raises(RuntimeFailedError, match="more than 2 restarts"):
            await queued.collect()
        with pytest.raises(RuntimeFailedError, match="more than 2 restarts"):
            rt.generate(greedy(PROMPTS[0]))
        status = rt.status()
    assert status.state == "failed"
    assert status.failure is not None and "slot 0 crashed" in status.failure
    assert isinstance(RuntimeFailedError("x"), RuntimeClosedError)


async def test_a_failed_step_fails_its_requests_and_the_loop_restarts() -> None:
    async with open_runtime("fake", slots=2) as rt:
        backend = rt.backend
        backend.fail_next_steps = 1  # type: ignore[attr-defined]
        from runtime import GenerationError

        with pytest.raises(GenerationError, match="model step failed"):
            await rt.complete(greedy(PROMPTS[0], max_tokens=5))
        ok = await rt.complete(greedy(PROMPTS[1], max_tokens=5))
        status = rt.status()
    assert ok.stats.completion_tokens == 5
    assert status.restarts == 1 and status.state == "ready"


async def test_no_backend_call_runs_on_the_event_loop_thread_but_a_short_prompts_tokenizing() -> None:
    """Steps, resizes and the rest run on the worker thread; a short prompt is tokenized on the
    event loop (tens of microseconds, less than a thread hop), a long one in a thread."""
    loop_thread = threading.get_ident()
    async with open_runtime("fake", slots=2, n_ctx_per_slot=4096) as rt:
        backend = rt.backend
        await rt.complete(greedy(PROMPTS[0], max_tokens=5))
        await rt.complete_chat(__import__("tests.helpers").helpers.chat("hi", max_tokens=3))
        short = set(backend.tokenize_threads)  # type: ignore[attr-defined]
        backend.tokenize_threads.clear()  # type: ignore[attr-defined]
        await rt.complete(greedy("x" * (INLINE_PROMPT_CHARS + 1), max_tokens=2))
        long = set(backend.tokenize_threads)  # type: ignore[attr-defined]
        threads = set(backend.call_threads)  # type: ignore[attr-defined]
    assert threads and loop_thread not in threads
    assert short == {loop_thread}
    assert long and loop_thread not in long


async def test_slow_reader_pauses_only_its_own_sequence() -> None:
    """A caller that does not read stalls its own request, never the batch."""
    async with open_runtime("fake", slots=2, stream_buffer=1) as rt:
        stalled = rt.generate(greedy(PROMPTS[0], max_tokens=300))
        await stalled.__anext__()
        other = await rt.complete(greedy(PROMPTS[1], max_tokens=200))
        model = rt.statistics().model
        await stalled.aclose()
    assert other.stats.completion_tokens == 200
    assert model.tokens_sampled < 300  # the stalled sequence did not run to its end


async def test_a_slow_reader_gets_every_token_and_the_final_chunk() -> None:
    """A one-chunk stream and a reader that dawdles: the sequence pauses and resumes, the answer
    is the one read at full speed, and the final chunk arrives although the stream was full."""
    async with open_runtime("fake", slots=2, stream_buffer=1) as rt:
        fast = await rt.complete(greedy(PROMPTS[2], max_tokens=40))
        chunks = []
        async with rt.generate(greedy(PROMPTS[2], max_tokens=40)) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                await anyio.sleep(0.003)
    assert tuple(t for c in chunks for t in c.token_ids) == fast.token_ids
    assert "".join(c.text for c in chunks) == fast.text
    assert chunks[-1].done and chunks[-1].done_reason == "length"


async def test_admission_timeout_waits_then_refuses() -> None:
    from runtime import QueueFullError

    async with open_runtime("fake", slots=1, max_queue=0, fake={"step_delay_s": 0.01}) as rt:
        busy = rt.generate(greedy(PROMPTS[0], max_tokens=50))
        waiting = rt.generate(greedy(PROMPTS[1], max_tokens=2), admission_timeout_s=0.05)
        with pytest.raises(QueueFullError, match="after waiting"):
            await waiting.collect()
        patient = rt.generate(greedy(PROMPTS[1], max_tokens=2), admission_timeout_s=10)
        first = await busy.collect()
        second = await patient.collect()
    assert first.stats.completion_tokens == 50
    assert second.stats.completion_tokens == 2


async def test_closing_the_runtime_cancels_and_refuses() -> None:
    async with open_runtime("fake", slots=1, fake={"step_delay_s": 0.005}) as rt:
        running = rt.generate(greedy(PROMPTS[0], max_tokens=400))
        queued = rt.generate(greedy(PROMPTS[1], max_tokens=5))
        await running.__anext__()
    chunks = [c async for c in running]
    assert chunks[-1].done_reason == "cancel"
    with pytest.raises(RuntimeClosedError):
        await queued.collect()
    with pytest.raises(RuntimeClosedError):
        rt.generate(greedy("x"))


async def test_a_request_that_crashes_its_slot_twice_is_failed_not_retried_again() -> None:
    """Nothing streamed yet: the request is retried once on the restarted slot; a second crash
    fails it back to the caller. The backoff between restarts is jittered but bounded."""
    fake = {"fault_prompts": ["boom"], "fault_after": 1}
    cfg = {"restart_intensity": 10, "restart_backoff_s": 0.05, "restart_backoff_max_s": 0.2}
    async with open_runtime("fake", slots=1, fake=fake, **cfg) as rt:
        start = anyio.current_time()
        with pytest.raises(SlotFailedError, match=r"\(2 crash\(es\)\)"):
            await rt.complete(greedy("boom", max_tokens=5))
        waited = anyio.current_time() - start
        after = await rt.complete(greedy(PROMPTS[0], max_tokens=3))
        status = rt.status()
    assert status.restarts == 2 and status.requests_failed == 1
    assert waited >= 0.025  # at least the first backoff (50% of 0.05 s)
    assert after.stats.completion_tokens == 3


async def test_closing_the_runtime_frees_a_slot_whose_caller_is_not_reading() -> None:
    """The slot waits for room in a full stream; the close cancels the request, and that ends
    the wait at once (not after the close's drain timeout)."""
    async with open_runtime("fake", slots=1, stream_buffer=1) as rt:
        stalled = rt.generate(greedy(PROMPTS[0], max_tokens=100))
        await stalled.__anext__()
        await anyio.sleep(0.1)  # the slot has filled the stream again and waits for room
        start = anyio.current_time()
    assert anyio.current_time() - start < 1.0
    assert [c.done_reason for c in [c async for c in stalled] if c.done] == ["cancel"]


async def test_a_late_cancel_of_a_crashed_request_leaves_the_next_one_alone() -> None:
    """Request A crashes its slot after streaming (so it is not retried); B then runs on the
    restarted slot; A's caller closing its stream afterwards must not touch B."""
    fake = {"fault_prompts": ["boom"], "fault_after": 4, "step_delay_s": 0.002}
    cfg = {"restart_intensity": 5, "restart_backoff_s": 0.001, "restart_backoff_max_s": 0.001}
    async with open_runtime("fake", slots=1, stream_buffer=64, fake=fake, **cfg) as rt:
        crashed = rt.generate(greedy("boom", max_tokens=20))
        await crashed.__anext__()
        with anyio.fail_after(3):
            while rt.status().restarts < 1:
                await anyio.sleep(0.005)
        after = rt.generate(greedy(PROMPTS[0], max_tokens=200))
        await after.__anext__()
        await crashed.aclose()
        with anyio.fail_after(3):
            rest = [c async for c in after]
    assert rest[-1].done_reason == "length" and rest[-1].stats is not None
    assert rest[-1].stats.completion_tokens == 200


async def test_an_observer_that_raises_fails_no_request() -> None:
    class Flaky(Observers):
        steps = 0

        def step(self, report: StepReport) -> None:
            self.steps += 1
            if self.steps == 5:
                raise RuntimeError("observer bug")

    flaky = Flaky()
    async with open_runtime("fake", slots=2, fake={"step_delay_s": 0.002}) as rt:
        rt.observers.add(flaky)
        results = [await rt.complete(greedy(p, max_tokens=20)) for p in PROMPTS[:2]]
    assert [r.stats.completion_tokens for r in results] == [20, 20]
    assert flaky.steps > 5 and rt.statistics().model.failed_steps == 0
