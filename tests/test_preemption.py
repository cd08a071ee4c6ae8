"""Preemption by snapshot (actors.preemption): a running request parked to host memory, its slot
serving another, and resumed where it was; by hand (Runtime.preempt) and for a higher priority."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from actors.scheduler import Scheduler, SequenceJob
from runtime import Runtime
from runtime.core.messages import ChatRequest, Chunk, Completion, CompletionBuilder, GenerateRequest
from runtime.core.preemption import Running, victim
from runtime.core.ticket import ResponseStream
from tests.helpers import chat, greedy, open_runtime, require_backend

STEP_S = 0.004


def test_the_lowest_priority_below_the_waiting_one_gives_way_the_latest_started_first() -> None:
    running = [
        Running(0, 1.0, False),
        Running(-2, 2.0, False),
        Running(-2, 3.0, False),
        Running(-5, 4.0, True),
    ]
    assert victim(1, running) == 2  # -5 is asked already; of the two at -2, the later one
    assert victim(-2, running) is None  # nothing runs strictly lower (but the one asked)
    assert victim(0, [Running(0, 1.0, False)]) is None  # equal priorities never preempt
    assert victim(3, []) is None


def test_a_tenant_under_its_share_claims_a_slot_from_one_over_its_own_and_never_back() -> None:
    def weight(tenant: str) -> float:
        return {"web": 3.0}.get(tenant, 1.0)

    a2 = [Running(0, 1.0, False, "a"), Running(0, 2.0, False, "a")]
    assert victim(0, a2, tenant="b", weight=weight) == 1  # 1 slot each: a's latest gives way
    assert victim(0, a2, tenant="b") is None  # no weights given: priorities only
    ab = [Running(0, 1.0, False, "a"), Running(0, 2.0, False, "b")]
    assert victim(0, ab, tenant="a", weight=weight) is None  # each holds its share
    assert victim(0, ab, tenant="b", weight=weight) is None
    batch2 = [Running(0, 1.0, False, "batch"), Running(0, 2.0, False, "batch")]
    assert victim(0, batch2, tenant="web", weight=weight) == 1  # web's share is 1.5: it claims one
    mixed = [Running(0, 1.0, False, "web"), Running(0, 2.0, False, "batch")]
    assert victim(0, mixed, tenant="web", weight=weight) is None  # 1 = floor(1.5): no more
    assert victim(0, mixed, tenant="batch", weight=weight) is None  # no claim back (floor(0.5) = 0)
    assert (
        victim(0, [*a2[:1], Running(0, 2.0, True, "a")], tenant="b", weight=weight) is None
    )  # one asked: a holds 1


class _Sink:
    blocked = False

    def take(self, *a: Any, **k: Any) -> bool:
        return True

    def fail(self, error: BaseException) -> None:
        raise AssertionError(error)


def test_a_job_pauses_only_past_its_first_token_and_resumes_in_another_sequence_where_it_was() -> None:
    scheduler = Scheduler(64)
    job = SequenceJob(0, [5, 6, 7], 0, 10, None, _Sink())
    scheduler.add(job)
    batch = scheduler.plan()
    assert batch is not None
    assert not scheduler.pause(job)  # evaluating its prompt: nothing sampled yet
    job.generated, job.next_token = 1, 9  # as advance leaves it after the prompt's step
    assert scheduler.pause(job) and scheduler.active == 0 and not job.done
    assert scheduler.plan() is None  # out of the steps, nothing queued for it
    scheduler.remove(2, keep=4)  # what the next sequence's last request left queued
    scheduler.resume(job, 2)
    batch = scheduler.plan()
    assert batch is not None and batch.rows == [job]
    assert (batch.plan.tokens.tolist(), batch.plan.positions.tolist(), batch.plan.seq_ids.tolist()) == (
        [9],
        [3],
        [2],
    )
    assert batch.plan.trims == [] and batch.plan.samplers == {}  # the restored cells and sampler stay


async def _read(stream: ResponseStream, into: list[Chunk]) -> Completion:
    answer = CompletionBuilder.for_request(stream.request)
    async with stream:
        async for chunk in stream:
            into.append(chunk)
            if (done := answer.add(chunk)) is not None:
                return done
    raise AssertionError("no final chunk")


async def _until(check: Any, what: str, timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not check():
            await anyio.sleep(0.002)


async def _parked_midway(
    rt: Runtime, request: GenerateRequest | ChatRequest, others: list[GenerateRequest]
) -> tuple[Completion, list[Completion]]:
    """Run ``request`` in the one slot with ``others`` waiting behind it, park it once 10
    tokens came (it goes behind them), and read everything to the end."""
    chunks: list[Chunk] = []
    results: dict[str, Any] = {}

    def tokens() -> int:
        return sum(len(c.token_ids) for c in chunks)

    async with anyio.create_task_group() as tg:

        async def long() -> None:
            results["long"] = await _read(rt.generate(request), chunks)

        async def rest() -> None:
            results["others"] = [await stream.collect() for stream in waiting]
            results["sent_when_others_ended"] = tokens()

        tg.start_soon(long)
        await _until(lambda: tokens() >= 10, "10 tokens")
        waiting = [rt.generate(r) for r in others]  # admitted now: they wait behind it
        assert await rt.preempt(0)
        tg.start_soon(rest)
    assert results["sent_when_others_ended"] < (request.max_tokens or 0)  # parked while they ran
    return results["long"], results["others"]


async def test_a_greedy_request_preempted_mid_answer_gives_the_same_text_and_counts_the_pause() -> None:
    request = greedy("a long story", max_tokens=60)
    short = [greedy(f"short {i}", max_tokens=5) for i in range(2)]
    async with open_runtime("fake", slots=1, memory_source="none", fake={"step_delay_s": STEP_S}) as rt:
        plain = await rt.complete(request)
        plain_short = [await rt.complete(r) for r in short]
    async with open_runtime("fake", slots=1, memory_source="none", fake={"step_delay_s": STEP_S}) as rt:
        done, others = await _parked_midway(rt, request, short)
        stats = rt.statistics().model.preemption
        assert stats is not None and (stats.preemptions, stats.resumes, stats.parked, stats.parked_bytes) == (
            1,
            1,
            0,
            0,
        )
        assert (await rt.complete(greedy("after", max_tokens=3))).stats.completion_tokens == 3
    assert done.text == plain.text and done.stats.completion_tokens == 60
    assert [o.text for o in others] == [o.text for o in plain_short]
    assert done.stats.preemptions == 1
    served = sum(o.stats.total_duration_ns - o.stats.queue_duration_ns for o in others)
    assert done.stats.preempted_duration_ns >= served  # parked while the others had the slot
    assert plain.stats.preemptions == 0 and plain.stats.preempted_duration_ns == 0


async def test_a_sampled_request_keeps_its_random_state_across_the_pause() -> None:
    request = GenerateRequest(prompt="sampled", max_tokens=40, temperature=0.8, seed=7, repeat_penalty=1.3)
    async with open_runtime("fake", slots=1, memory_source="none", fake={"step_delay_s": STEP_S}) as rt:
        plain = await rt.complete(request)
        done, _ = await _parked_midway(rt, request, [greedy("other", max_tokens=4)])
    assert done.text == plain.text and done.stats.preemptions == 1


async def _low_then_high(preemption: bool) -> tuple[Completion, Completion, Completion, int]:
    """A low-priority request running in the one slot, then a high one: (the low one alone,
    the low one, the high one, the low one's tokens sent when the high one ended)."""
    low = greedy("low priority story", max_tokens=80, priority=-1)
    high = greedy("urgent", max_tokens=5, priority=5)
    chunks: list[Chunk] = []
    results: dict[str, Completion] = {}
    async with open_runtime("fake", slots=1, memory_source="none", preemption=preemption,
                            fake={"step_delay_s": STEP_S}) as rt:  # fmt: skip
        plain = await rt.complete(low)
        async with anyio.create_task_group() as tg:

            async def run_low() -> None:
                results["low"] = await _read(rt.generate(low), chunks)

            tg.start_soon(run_low)
            await _until(lambda: len(chunks) >= 5, "the low one running")
            results["high"] = await rt.complete(high)
            sent = sum(len(c.token_ids) for c in chunks)
    return plain, results["low"], results["high"], sent


async def test_a_higher_priority_request_takes_the_slot_of_a_lower_one_that_resumes_after() -> None:
    plain, low, high, sent = await _low_then_high(preemption=True)
    assert sent < 80  # the urgent one did not wait for it
    assert low.stats.preemptions == 1 and low.text == plain.text
    assert high.stats.completion_tokens == 5 and high.stats.preemptions == 0
    plain, low, high, sent = await _low_then_high(preemption=False)
    assert sent == 80  # it waited for the whole low answer
    assert low.stats.preemptions == 0 and high.stats.completion_tokens == 5


async def test_a_tenant_arriving_behind_another_tenants_flood_starts_at_once() -> None:
    async with open_runtime(
        "fake", slots=2, memory_source="none", max_queue=16, fake={"step_delay_s": STEP_S}
    ) as rt:
        flood = [rt.generate(greedy(f"a{i}", max_tokens=60, tenant="a")) for i in range(6)]
        await _until(lambda: rt.statistics().model.tokens_sampled >= 4, "a's first two decoding")
        b = await rt.complete(greedy("b", max_tokens=4, tenant="b"))
        answers = [await s.collect() for s in flood]
    assert b.stats.queue_duration_ns < 15 * STEP_S * 1e9  # it did not wait 60 steps for one of a's
    assert sum(a.stats.preemptions for a in answers) == 1
    assert [a.stats.completion_tokens for a in answers] == [60] * 6


async def test_a_tenant_under_its_share_keeps_getting_a_slot_from_callers_that_do_not_read() -> None:
    """Weights web=3, batch=1 on 4 slots held by batch's callers, who read nothing: each of web's
    requests, one after another, takes a slot at once (the parked batch request keeps its charge,
    else its tenant's virtual time fell below web's and the slot went straight back to it)."""
    async with open_runtime("fake", slots=4, memory_source="none", max_queue=64, tenant_weights="web=3,batch=1",
                            fake={"step_delay_s": STEP_S}) as rt:  # fmt: skip
        flood = [rt.generate(greedy(f"b{i}", max_tokens=40, tenant="batch")) for i in range(8)]
        await _until(lambda: rt.statistics().model.tokens_sampled >= 8, "batch decoding")
        web = []
        for i in range(3):
            with anyio.fail_after(10):
                web.append(await rt.complete(greedy(f"w{i}", max_tokens=4, tenant="web")))
        assert [w.stats.completion_tokens for w in web] == [4, 4, 4]
        assert all(w.stats.queue_duration_ns < 15 * STEP_S * 1e9 for w in web)
        assert rt.statistics().model.preemption.preemptions == 3  # type: ignore[union-attr]
        answers = [await s.collect() for s in flood]
    assert [a.stats.completion_tokens for a in answers] == [40] * 8


async def test_a_request_cancelled_while_parked_frees_its_snapshot_and_nothing_else_is_lost() -> None:
    long = greedy("a long story", max_tokens=200)
    async with open_runtime("fake", slots=1, memory_source="none", fake={"step_delay_s": STEP_S}) as rt:
        chunks: list[Chunk] = []
        stream = rt.generate(long)

        async def read() -> None:
            async with stream:
                async for chunk in stream:
                    chunks.append(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await _until(lambda: len(chunks) >= 3, "started")
            blocker = rt.generate(greedy("blocker", max_tokens=30))  # waits behind it
            assert await rt.preempt(0)
            await stream.aclose()  # cancelled while parked (the blocker holds the slot)
            assert (await blocker.collect()).stats.completion_tokens == 30
        stats = rt.statistics().model.preemption
        assert stats is not None and (stats.parked, stats.resumes, stats.parked_bytes) == (0, 0, 0)
        assert rt.status().slots_busy == 0
        assert (await rt.complete(greedy("next", max_tokens=4))).stats.completion_tokens == 4


async def test_preempt_refuses_an_idle_slot_and_parks_a_request_once_it_has_its_first_token() -> None:
    async with open_runtime("fake", slots=1, memory_source="none", fake={"step_delay_s": 0.05}) as rt:
        assert not await rt.preempt(0)  # idle
        assert not await rt.preempt(7)  # no such slot
        stream = rt.generate(greedy("x" * 300, max_tokens=4))
        await _until(lambda: rt.status().slots_busy == 1, "taken")
        assert rt.statistics().model.tokens_sampled == 0  # its prompt is still evaluating
        assert await rt.preempt(0)  # parked after its first token (and resumed: nothing waits)
        done = await stream.collect()
        assert done.stats.preemptions == 1 and done.stats.completion_tokens == 4


@pytest.mark.timeout(300)
async def test_llama_cpp_greedy_text_is_the_same_after_a_preemption() -> None:
    require_backend("llama_cpp")
    request = chat("Write a short story about a lighthouse keeper.", max_tokens=40)
    other = [greedy("The capital of France is", max_tokens=8)]
    async with open_runtime(
        "llama_cpp", slots=1, n_ctx_per_slot=256, memory_source="none", prefix_cache=False
    ) as rt:
        plain = await rt.complete(request)
        done, _ = await _parked_midway(rt, request, other)
    assert done.stats.preemptions == 1 and done.stats.completion_tokens == plain.stats.completion_tokens
    assert done.text == plain.text and len(plain.text) > 40
