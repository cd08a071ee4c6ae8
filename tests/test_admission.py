"""Admission beyond first come first served, on the fake backend with a step delay: tenants
share the slots fairly and by weight, priority goes first and aging bounds the wait, the
predicted start is close to the actual one, a deadline that cannot be met is refused at once.

Measurements are event-driven (the order in which slots take requests, the queue time each
request's stats report); the few time bounds are generous (the CI machine is loaded)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import anyio
import pytest

from runtime import Completion, DeadlineUnmetError, ResponseStream, Runtime, TenantQueueFullError
from runtime.core.messages import GenerateRequest
from tests.helpers import greedy, open_runtime, wait_until

STEP_S = 0.002


class Starts:
    """The (priority, tenant) label of each request a slot took, in order (an Observer)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.errors: list[float] = []

    def request_started(self, priority: str, tenant: str, wait_s: float, error_s: float | None) -> None:
        self.seen.append((priority, tenant))
        if error_s is not None:
            self.errors.append(error_s)


async def _run_all(rt: Runtime, requests: list[GenerateRequest], out: list[Completion]) -> None:
    async with anyio.create_task_group() as tg:
        for r in requests:

            async def one(r: GenerateRequest = r) -> None:
                out.append(await rt.complete(r))

            tg.start_soon(one)


def _queue_s(c: Completion) -> float:
    return c.stats.queue_duration_ns / 1e9


async def _b_queue_p50(flood: int) -> tuple[float, int]:
    """B's queue-time p50 when it sends 4 after tenant A sent ``flood``; and A's completions."""
    async with open_runtime("fake", slots=2, max_queue=64, fake={"step_delay_s": STEP_S}) as rt:
        a_done: list[Completion] = []
        b_done: list[Completion] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_all, rt, [greedy(f"a{i}", 16, tenant="a") for i in range(flood)], a_done)
            if flood:
                await wait_until(lambda: rt.status().slots_busy == 2 and rt.status().queue_depth == flood - 2)
            tg.start_soon(_run_all, rt, [greedy(f"b{i}", 16, tenant="b") for i in range(4)], b_done)
        assert all(c.done_reason == "length" for c in a_done + b_done)
        return statistics.median(map(_queue_s, b_done)), len(a_done)


async def test_a_flooding_tenant_does_not_starve_a_later_one() -> None:
    """A floods 40 on 2 slots, B sends 4 after: B's requests go between A's (not after all 38
    waiting), every one of A's completes. First come first served would make B wait for 19
    rounds; fair queuing, about 2.5 (B takes every other slot that frees). B alone waits half
    a round at the median (two start at once, two after one round); under the flood, fair-share
    preemption gives B's first request one of A's slots at once, but B's four then run one after
    another on its share of 1 slot, so B's median is about three times alone (the figure the
    benchmark prints), not within 2x."""
    alone, _ = await _b_queue_p50(0)
    flooded, a_completed = await _b_queue_p50(40)
    assert a_completed == 40
    round_s = 16 * STEP_S  # one request's time in a slot, at the least
    assert flooded < 8 * max(alone, round_s / 2), (flooded, alone)  # FIFO: about 19 rounds


async def test_weights_three_to_one_share_the_slots_three_to_one() -> None:
    """Both tenants backlogged on 2 slots with weights web=3, batch=1: of the 40 requests that
    start while both wait, web gets 30 and batch 10 (within 10%)."""
    starts = Starts()
    async with open_runtime(
        "fake", slots=2, max_queue=128, tenant_weights="web=3,batch=1", metrics_tenants="web,batch",
        fake={"step_delay_s": STEP_S},
    ) as rt:  # fmt: skip
        rt.observers.add(starts)
        done: list[Completion] = []
        requests = [greedy(f"{t}{i}", 4, tenant=t) for i in range(50) for t in ("web", "batch")]
        await _run_all(rt, requests, done)
    assert len(done) == 100
    window = [tenant for _, tenant in starts.seen[2:42]]  # the first two took the idle slots
    share = window.count("web") / window.count("batch")
    assert 3 * 0.9 <= share <= 3 * 1.1, window


async def _collect(stream: ResponseStream, out: list[Completion]) -> None:
    out.append(await stream.collect())


async def test_a_high_priority_request_behind_twenty_starts_next() -> None:
    starts = Starts()
    async with open_runtime("fake", slots=1, max_queue=64, fake={"step_delay_s": STEP_S}) as rt:
        rt.observers.add(starts)
        done: list[Completion] = []
        streams = [rt.generate(greedy(f"q{i}", 8)) for i in range(21)]  # one runs, twenty wait
        streams.append(rt.generate(greedy("urgent", 8, priority=5)))
        assert rt.status().queue[0].priority == 5
        async with anyio.create_task_group() as tg:
            for stream in streams:
                tg.start_soon(_collect, stream, done)
    assert len(done) == 22
    assert starts.seen[:3] == [("default", "default"), ("high", "default"), ("default", "default")]


async def test_a_low_priority_request_starts_within_the_aging_bound() -> None:
    """One slot, a low request behind a stream of high ones that would starve it: it waits
    until it has aged (0.3 s), then goes before the high ones still waiting."""
    starts = Starts()
    async with open_runtime(
        "fake", slots=1, max_queue=64, queue_aging_s=0.3, fake={"step_delay_s": STEP_S}
    ) as rt:
        rt.observers.add(starts)
        done: list[Completion] = []
        low: list[Completion] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_collect, rt.generate(greedy("first", 8, priority=1)), done)
            tg.start_soon(_collect, rt.generate(greedy("low", 8, priority=-1)), low)
            for i in range(40):  # each takes 16 ms or more; one every 10 ms keeps high ones waiting
                tg.start_soon(_collect, rt.generate(greedy(f"high{i}", 8, priority=1)), done)
                await anyio.sleep(0.01)
    waited_s = _queue_s(low[0])
    assert waited_s >= 0.3 * 0.9  # the high ones went first until it aged (the clocks differ a little)
    assert waited_s < 0.3 + 1.0  # then it went next (one request's time, generous for a loaded machine)
    at = starts.seen.index(("low", "default"))
    assert at < len(starts.seen) - 5  # high ones admitted before it aged still waited after it


async def test_the_predicted_start_is_close_to_the_actual_for_most() -> None:
    """Steady load: 2 slots, requests of 16 tokens arriving faster than they are served; the
    predicted start at admission against the queue time the stats report."""
    async with open_runtime("fake", slots=2, max_queue=64, fake={"step_delay_s": 0.005}) as rt:
        warm: list[Completion] = []
        await _run_all(rt, [greedy(f"w{i}", 16) for i in range(4)], warm)  # the rates are measured
        pairs: list[tuple[float, float]] = []

        async def one(i: int) -> None:
            stream = rt.generate(greedy(f"r{i}", 16))
            predicted = stream.estimate
            result = await stream.collect()
            assert predicted is not None and predicted.predicted_start_s is not None
            pairs.append((predicted.predicted_start_s, _queue_s(result)))

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
                await anyio.sleep(0.03)
    waited = [(p, a) for p, a in pairs if a > 0.05]  # those that queued for a while
    assert len(waited) >= 10, pairs
    # the benchmark measures 80% or more within 25% (section 8); a loaded CI machine gets a wider bound
    close = [abs(p - a) <= 0.5 * a for p, a in waited]
    assert sum(close) >= 0.6 * len(close), waited


async def test_an_unmeetable_deadline_is_refused_at_once_with_retry_after_from_the_prediction() -> None:
    async with open_runtime("fake", slots=2, max_queue=16, fake={"step_delay_s": 0.005}) as rt:
        warm: list[Completion] = []
        await _run_all(rt, [greedy(f"w{i}", 8) for i in range(2)], warm)
        running = [rt.generate(greedy(f"long{i}", 100)) for i in range(2)]
        await wait_until(lambda: rt.status().slots_busy == 2)
        started = time.perf_counter()
        with pytest.raises(DeadlineUnmetError, match="deadline_ms is 50") as refused:
            rt.generate(greedy("hurry", 8, deadline_ms=50))
        refused_s = time.perf_counter() - started
        retry_s = refused.value.retry_after_s
        assert retry_s is not None
        freed: list[float] = []
        for stream in running:
            await stream.collect()
            freed.append(time.perf_counter() - started)
        met = rt.generate(greedy("calm", 8, deadline_ms=60_000))  # a deadline that holds is admitted
        assert (await met.collect()).done_reason == "length"
        status = rt.status()
    assert refused_s < 0.5  # measured under 10 ms (the benchmark); a loaded CI machine is slower
    assert 0.25 * min(freed) <= retry_s <= 2.5 * min(freed), (retry_s, freed)
    assert status.requests_rejected == 1 and status.requests_admitted == 5


async def test_a_tenant_over_its_queue_cap_is_refused_while_others_are_admitted() -> None:
    async with open_runtime(
        "fake", slots=1, max_queue=16, tenant_max_queued=2, fake={"step_delay_s": STEP_S}
    ) as rt:
        streams = [rt.generate(greedy(f"a{i}", 50, tenant="a")) for i in range(3)]  # one runs, two wait
        await wait_until(lambda: rt.status().steps >= 2)  # the rates are measured
        with pytest.raises(TenantQueueFullError, match="tenant 'a' has 2 requests waiting") as refused:
            rt.generate(greedy("a3", 8, tenant="a"))
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
        streams.append(rt.generate(greedy("b0", 8, tenant="b")))
        queue = rt.status().queue
        assert [(q.position, q.tenant) for q in queue] == [(0, "a"), (1, "b"), (2, "a")]
        assert all(q.predicted_start_s is not None for q in queue)
        for s in streams:
            assert (await s.collect()).done_reason == "length"


async def test_the_queue_event_comes_first_when_asked_and_carries_no_text() -> None:
    async with open_runtime("fake", slots=1, max_queue=4, fake={"step_delay_s": STEP_S}) as rt:
        first = rt.generate(greedy("first", 6))
        await wait_until(lambda: rt.status().slots_busy == 1)
        stream = rt.generate(greedy("second", 4), queue_event=True)
        await first.collect()
        chunks: list[Any] = [c async for c in stream]
    event = chunks[0]
    assert event.queue is not None and event.queue.position == 0
    assert (event.text, event.token_ids, event.done) == ("", (), False)
    assert all(c.queue is None for c in chunks[1:]) and chunks[-1].done


async def test_a_timed_admission_waits_for_room_then_has_its_estimate_and_its_deadline() -> None:
    async with open_runtime("fake", slots=1, max_queue=1, fake={"step_delay_s": STEP_S}) as rt:
        running = rt.generate(greedy("running", 30))
        await wait_until(lambda: rt.status().steps >= 2)
        queued = rt.generate(greedy("queued", 4))
        waiting = rt.generate(greedy("waiting", 4), admission_timeout_s=30, queue_event=True)
        late = rt.generate(greedy("late", 4, deadline_ms=1), admission_timeout_s=30)
        done: list[Completion] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_collect, running, done)
            tg.start_soon(_collect, queued, done)
            event = await waiting.__anext__()  # admitted once "queued" took the slot
            with pytest.raises(DeadlineUnmetError):
                await late.__anext__()
        assert event.queue is not None and waiting.estimate is event.queue
        assert (await waiting.collect()).done_reason == "length"
    assert len(done) == 2
