"""Section 8, admission: fairness between tenants, weighted shares, the predicted start's error
and how fast an unmeetable deadline is refused, on the fake backend with a step delay.

- fairness: 2 slots; tenant A sends ``flood`` requests, then tenant B sends 4. B's queue-time
  median alone, under the flood with fair queuing (with fair-share preemption, and without),
  and under the flood first come first served (B's requests as A's tenant: what a FIFO queue does).
- weights: 2 slots, tenants web=3 and batch=1 both backlogged for ``window_s`` seconds: the
  ratio of the requests each started.
- prediction: a steady load on 2 slots; the share of requests that waited whose predicted start
  was within 25% of the actual, and the median relative error.
- deadline: both slots busy; a request with a deadline the prediction cannot meet is refused:
  the time that took, and its Retry-After against when a slot really freed.
- priority: both slots busy with long requests of priority -1 and 20 more queued; a request of
  priority 1 arrives: its queue time with preemption (a long one is parked, actors.preemption)
  and without (it waits for a long one to end), and whether the parked one's greedy text equals
  its text alone.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import TextIO

import anyio
import msgspec
from prometheus_client import CollectorRegistry

from runtime.backends.fake import FakeBackend
from runtime.core.config import RuntimeConfig
from runtime.core.errors import DeadlineUnmetError
from runtime.core.messages import Completion, GenerateRequest
from runtime.runtime import Runtime

__all__ = ["AdmissionFigures", "measure_admission", "print_admission"]


class AdmissionFigures(msgspec.Struct, frozen=True, kw_only=True):
    """What section 7 measured (seconds unless named otherwise)."""

    step_delay_s: float
    b_queue_p50_alone_s: float
    b_queue_p50_fair_s: float
    """With fair-share preemption (the default): B takes one of A's slots at once."""
    b_queue_p50_fair_no_preemption_s: float
    b_queue_p50_fifo_s: float
    a_completed: int
    weights_window_s: float
    web_per_batch_started: float
    """Requests web started per request batch started (weights 3:1)."""
    predicted_within_25_percent: float
    """Share of the requests that waited whose predicted start was within 25% of the actual."""
    prediction_median_relative_error: float
    deadline_refusal_ms_median: float
    deadline_refusal_ms_max: float
    retry_after_over_slot_free: float
    """The refusal's retry_after_s over the seconds until a slot really freed (1 is exact)."""
    high_queue_ms_preempting: float
    """A priority-1 request's queue time behind 2 busy slots and 20 queued, with preemption."""
    high_queue_ms_waiting: float
    """The same with ``preemption`` off."""
    preempted_text_equal: bool
    """The parked request's greedy text equals its text alone."""


def _request(prompt: str, max_tokens: int, **fields: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0, **fields)  # type: ignore[arg-type]


def _runtime(step_delay_s: float, **config: object) -> Runtime:
    cfg = RuntimeConfig(backend="fake", slots=2, n_ctx_per_slot=512, **config)  # type: ignore[arg-type]
    backend = FakeBackend(n_seq_max=2, n_ctx_per_slot=512, step_delay_s=step_delay_s)
    return Runtime(cfg, backend=backend, registry=CollectorRegistry(), probe=None)


async def _all(rt: Runtime, requests: list[GenerateRequest], out: list[Completion]) -> None:
    async with anyio.create_task_group() as tg:
        for r in requests:

            async def one(r: GenerateRequest = r) -> None:
                out.append(await rt.complete(r))

            tg.start_soon(one)


async def _until(predicate: Callable[[], object], timeout_s: float = 60.0) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 -- it reads status snapshots: there is no event to wait on
            await anyio.sleep(0.001)


def _queue_s(c: Completion) -> float:
    return c.stats.queue_duration_ns / 1e9


async def _b_p50(
    step_delay_s: float, flood: int, b_tenant: str, preemption: bool = True
) -> tuple[float, int]:
    async with _runtime(step_delay_s, max_queue=flood + 8, preemption=preemption) as rt:
        a: list[Completion] = []
        b: list[Completion] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_all, rt, [_request(f"a{i}", 16, tenant="a") for i in range(flood)], a)
            if flood:
                await _until(lambda: rt.status().slots_busy == 2 and rt.status().queue_depth == flood - 2)
            tg.start_soon(_all, rt, [_request(f"b{i}", 16, tenant=b_tenant) for i in range(4)], b)
        return statistics.median(map(_queue_s, b)), len(a)


async def _weights(step_delay_s: float, window_s: float) -> float:
    started: list[str] = []

    class Starts:
        def request_started(self, priority: str, tenant: str, wait_s: float, error_s: float | None) -> None:
            started.append(tenant)

    async with _runtime(
        step_delay_s, max_queue=4096, tenant_weights="web=3,batch=1", metrics_tenants="web,batch"
    ) as rt:
        rt.observers.add(Starts())
        n = int(window_s / (4 * step_delay_s)) + 8  # more than 2 slots start in the window
        done: list[Completion] = []
        with anyio.move_on_after(window_s):
            await _all(
                rt, [_request(f"{t}{i}", 4, tenant=t) for i in range(n) for t in ("web", "batch")], done
            )
    window = started[2:]
    return window.count("web") / max(1, window.count("batch"))


async def _prediction(step_delay_s: float, requests: int) -> tuple[float, float]:
    async with _runtime(step_delay_s, max_queue=4096) as rt:
        await _all(rt, [_request(f"w{i}", 16) for i in range(4)], [])
        pairs: list[tuple[float, float]] = []

        async def one(i: int) -> None:
            stream = rt.generate(_request(f"r{i}", 16))
            estimate = stream.estimate
            result = await stream.collect()
            if estimate is not None and estimate.predicted_start_s is not None:
                pairs.append((estimate.predicted_start_s, _queue_s(result)))

        arrival_s = 16 * step_delay_s * 0.4  # a little faster than 2 slots serve: the queue grows slowly
        async with anyio.create_task_group() as tg:
            for i in range(requests):
                tg.start_soon(one, i)
                await anyio.sleep(arrival_s)
    waited = [(p, a) for p, a in pairs if a > 4 * step_delay_s]
    errors = [abs(p - a) / a for p, a in waited]
    return sum(e <= 0.25 for e in errors) / max(1, len(errors)), statistics.median(errors) if errors else 0.0


async def _deadline(step_delay_s: float, tries: int) -> tuple[list[float], float]:
    async with _runtime(step_delay_s, max_queue=16) as rt:
        await _all(rt, [_request(f"w{i}", 8) for i in range(2)], [])
        running = [rt.generate(_request(f"long{i}", 200)) for i in range(2)]
        await _until(lambda: rt.status().slots_busy == 2)
        refusals_ms: list[float] = []
        retry_s = 0.0
        started = time.perf_counter()
        for i in range(tries):
            t0 = time.perf_counter()
            try:
                rt.generate(_request(f"hurry{i}", 8, deadline_ms=1))
            except DeadlineUnmetError as exc:
                refusals_ms.append((time.perf_counter() - t0) * 1000)
                if i == 0:
                    retry_s, started = exc.retry_after_s or 0.0, t0
        first_free = float("inf")
        for stream in running:
            await stream.collect()
            first_free = min(first_free, time.perf_counter() - started)
    return refusals_ms, retry_s / first_free


async def _priority_jump(step_delay_s: float, preemption: bool) -> tuple[float, bool]:
    """(the high request's queue seconds, whether each long request's text equals its text
    alone, preempted or not)."""
    longs = [_request(f"long {i}", 120, priority=-1) for i in range(2)]
    async with _runtime(step_delay_s, max_queue=32, preemption=preemption) as rt:
        alone = [(await rt.complete(r)).text for r in longs]
        done: list[Completion] = []
        queued: list[Completion] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_all, rt, longs, done)
            await _until(lambda: rt.status().slots_busy == 2)
            await anyio.sleep(20 * step_delay_s)  # both are decoding
            tg.start_soon(_all, rt, [_request(f"q{i}", 8, priority=-1) for i in range(20)], queued)
            await _until(lambda: rt.status().queue_depth == 20)
            high = await rt.complete(_request("urgent", 8, priority=1))
        texts = {c.text for c in done}
    return _queue_s(high), texts == set(alone)


async def measure_admission(
    *, step_delay_s: float = 0.002, flood: int = 40, window_s: float = 5.0, requests: int = 60
) -> AdmissionFigures:
    """Run the four measurements (about ``window_s`` + 10 s at the defaults)."""
    alone, _ = await _b_p50(step_delay_s, 0, "b")
    fair, a_completed = await _b_p50(step_delay_s, flood, "b")
    fair_waiting, _ = await _b_p50(step_delay_s, flood, "b", preemption=False)
    fifo, _ = await _b_p50(step_delay_s, flood, "a")
    share = await _weights(step_delay_s, window_s)
    within, median_error = await _prediction(step_delay_s * 2.5, requests)
    refusals, retry_ratio = await _deadline(step_delay_s * 2.5, 50)
    preempting, equal = await _priority_jump(step_delay_s, preemption=True)
    waiting, _ = await _priority_jump(step_delay_s, preemption=False)
    return AdmissionFigures(
        step_delay_s=step_delay_s,
        b_queue_p50_alone_s=alone,
        b_queue_p50_fair_s=fair,
        b_queue_p50_fair_no_preemption_s=fair_waiting,
        b_queue_p50_fifo_s=fifo,
        a_completed=a_completed,
        weights_window_s=window_s,
        web_per_batch_started=share,
        predicted_within_25_percent=within,
        prediction_median_relative_error=median_error,
        deadline_refusal_ms_median=statistics.median(refusals),
        deadline_refusal_ms_max=max(refusals),
        retry_after_over_slot_free=retry_ratio,
        high_queue_ms_preempting=preempting * 1000,
        high_queue_ms_waiting=waiting * 1000,
        preempted_text_equal=equal,
    )


def print_admission(f: AdmissionFigures, out: TextIO = sys.stdout) -> None:
    """Section 7's table."""
    out.write(
        f"\nsection 9: admission (fake backend, {f.step_delay_s * 1000:g} ms steps, 2 slots)\n"
        f"  B's queue p50: alone {f.b_queue_p50_alone_s * 1000:.0f} ms, under A's flood fair "
        f"{f.b_queue_p50_fair_s * 1000:.0f} ms ({f.b_queue_p50_fair_s / max(f.b_queue_p50_alone_s, 1e-9):.1f}x; "
        f"without preemption {f.b_queue_p50_fair_no_preemption_s * 1000:.0f} ms), "
        f"first come first served {f.b_queue_p50_fifo_s * 1000:.0f} ms; A completed {f.a_completed}\n"
        f"  weights 3:1 over {f.weights_window_s:g} s: {f.web_per_batch_started:.2f} started per 1\n"
        f"  predicted start within 25%: {f.predicted_within_25_percent:.0%} "
        f"(median error {f.prediction_median_relative_error:.0%})\n"
        f"  unmeetable deadline refused in {f.deadline_refusal_ms_median:.3f} ms (median; max "
        f"{f.deadline_refusal_ms_max:.3f}); Retry-After / slot free {f.retry_after_over_slot_free:.2f}\n"
        f"  priority 1 behind 2 busy slots and 20 queued: queue {f.high_queue_ms_preempting:.1f} ms with "
        f"preemption, {f.high_queue_ms_waiting:.1f} ms without; parked greedy text equal: {f.preempted_text_equal}\n"
    )
    out.flush()


if __name__ == "__main__":  # python -m runtime.bench.admission: this section alone
    figures = anyio.run(measure_admission)
    print_admission(figures)
    print(msgspec.json.encode(figures).decode())
