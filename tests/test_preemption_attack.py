"""Preemption by snapshot under attack: storms of priorities, cancels at every moment, a close
or a drain with requests parked, slow readers, constrained and sampled answers, choices, tenant
caps, aging, a resize, a failing restore, and an HTTP stream that pauses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from actors.model import ModelActor
from runtime import Runtime
from runtime.core.errors import GenerationError, RuntimeClosedError
from runtime.core.fair_queue import FairQueue, Placement, QueuePolicy
from runtime.core.mailbox import Mailbox
from runtime.core.messages import (
    ChatMessage,
    ChatRequest,
    Chunk,
    Completion,
    CompletionBuilder,
    GenerateRequest,
)
from runtime.core.ticket import ResponseStream, Ticket
from runtime.server import create_app
from tests.helpers import greedy, open_runtime, require_backend, wait_until

STEP_S = 0.003
FAST = {"step_delay_s": STEP_S}


def _ticket(stream: ResponseStream) -> Ticket:
    return stream._ticket


def _model(rt: Runtime) -> ModelActor:
    model = rt._model
    assert model is not None
    return model


def _slot_of(rt: Runtime, stream: ResponseStream) -> int:
    """The slot serving ``stream``'s request."""
    supervisor = rt._status_unit(None)._supervisor
    assert supervisor is not None
    return next(i for i in range(rt.status().slots_effective) if supervisor.serving(i) is _ticket(stream))


def _parked(rt: Runtime) -> tuple[int, int]:
    stats = rt.statistics().model.preemption
    assert stats is not None
    return stats.parked, stats.parked_bytes


def _blocked(ticket: Ticket) -> bool:
    """Whether the request's sink is blocked (its caller fell behind)."""
    sink = getattr(ticket.serving, "sink", None)
    return bool(sink is not None and sink.blocked)


class Reader:
    """Reads one stream in the background, keeping its chunks; ``result`` once it ended."""

    def __init__(self, stream: ResponseStream) -> None:
        self.stream = stream
        self.chunks: list[Chunk] = []
        self.result: Completion | None = None
        self.error: BaseException | None = None
        self.ended = anyio.Event()

    @property
    def tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    async def run(self) -> None:
        answer = CompletionBuilder.for_request(self.stream.request)
        try:
            async with self.stream:
                async for chunk in self.stream:
                    self.chunks.append(chunk)
                    if (done := answer.add(chunk)) is not None:
                        self.result = done
        except Exception as exc:
            self.error = exc
        finally:
            self.ended.set()


async def _alone(requests: list[GenerateRequest], **config: Any) -> list[Completion]:
    """Each request on its own in a fresh runtime of one slot: never preempted."""
    config.setdefault("memory_source", "none")
    out = []
    async with open_runtime("fake", slots=1, fake=FAST, **config) as rt:
        for r in requests:
            out.append(await rt.complete(r))
    return out


# -- storms ------------------------------------------------------------------------------------


async def test_a_storm_of_rising_priorities_completes_every_request_once_and_exactly() -> None:
    lows = [greedy(f"low story {i}", max_tokens=40, priority=0) for i in range(3)]
    highs = [greedy(f"urgent {i}", max_tokens=6, priority=1 + i % 5) for i in range(12)]
    plain = await _alone(lows + highs)
    async with open_runtime("fake", slots=2, memory_source="none", fake=FAST) as rt:
        readers = [Reader(rt.generate(r)) for r in lows]
        async with anyio.create_task_group() as tg:
            for reader in readers:
                tg.start_soon(reader.run)
            await wait_until(lambda: sum(r.tokens > 0 for r in readers) == 2, 10)
            for r in highs:
                reader = Reader(rt.generate(r))
                readers.append(reader)
                tg.start_soon(reader.run)
                await wait_until(lambda: any(x.tokens > 0 for x in readers[3:]), 10)
        stats = rt.statistics().model.preemption
        assert rt.status().slots_busy == 0
    assert stats is not None and stats.preemptions >= 2 and stats.parked == 0 and stats.parked_bytes == 0
    assert stats.resumes + stats.failed_resumes == stats.preemptions and stats.failed_resumes == 0
    for reader, want in zip(readers, plain, strict=True):
        assert reader.error is None and reader.result is not None
        assert reader.result.text == want.text, want.text
        assert reader.result.stats.completion_tokens == want.stats.completion_tokens
        assert "".join(c.text for c in reader.chunks) == want.text  # each piece sent once
    assert sum(r.result.stats.preemptions for r in readers if r.result) == stats.preemptions


async def test_manual_preempts_over_and_over_keep_the_text_exact() -> None:
    request = greedy("a long story told in pieces", max_tokens=60)
    others = [greedy(f"other {i}", max_tokens=3) for i in range(6)]
    plain = await _alone([request, *others])
    async with open_runtime("fake", slots=1, memory_source="none", fake=FAST) as rt:
        reader = Reader(rt.generate(request))
        results = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            for other in others:
                seen = reader.tokens
                await wait_until(lambda s=seen: reader.tokens > s, 10)  # type: ignore[misc]
                waiting = rt.generate(other)
                if await rt.preempt(0):
                    results.append(await waiting.collect())
                else:
                    results.append(await waiting.collect())
        assert _parked(rt) == (0, 0)
    assert reader.result is not None and reader.result.text == plain[0].text
    assert reader.result.stats.preemptions >= 3
    assert [r.text for r in results] == [p.text for p in plain[1:]]


# -- cancels at every moment -------------------------------------------------------------------


async def _cancel_inside(
    monkeypatch: pytest.MonkeyPatch, method: str, *, after: bool
) -> tuple[Reader, Completion, tuple[int, int], int]:
    """Run a long request in the one slot, preempt it with another waiting, and cancel it from
    inside ModelActor.``method`` (before it returns if not ``after``)."""
    target: list[Ticket] = []
    original: Callable[..., Awaitable[Any]] = getattr(ModelActor, method)

    async def patched(self: ModelActor, *args: Any, **kw: Any) -> Any:
        if target and not after:
            target[0].cancel()
        out = await original(self, *args, **kw)
        if target and after:
            target[0].cancel()
        return out

    monkeypatch.setattr(ModelActor, method, patched)
    async with open_runtime("fake", slots=1, memory_source="none", fake=FAST) as rt:
        stream = rt.generate(greedy("a long story", max_tokens=200))
        reader = Reader(stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await wait_until(lambda: reader.tokens >= 3, 10)
            other = rt.generate(greedy("the other", max_tokens=5))
            target.append(_ticket(stream))
            await rt.preempt(0)
            done = await other.collect()
            with anyio.fail_after(10):
                await reader.ended.wait()
        after_one = await rt.complete(greedy("next", max_tokens=4))
        parked = _parked(rt)
        busy = rt.status().slots_busy
    assert after_one.stats.completion_tokens == 4
    return reader, done, parked, busy


@pytest.mark.parametrize("after", [False, True], ids=["during", "right-after"])
async def test_a_cancel_while_the_request_is_being_parked_frees_its_snapshot(
    monkeypatch: pytest.MonkeyPatch, after: bool
) -> None:
    reader, other, parked, busy = await _cancel_inside(monkeypatch, "pause", after=after)
    assert other.stats.completion_tokens == 5
    assert reader.result is None or reader.result.done_reason == "cancel"
    assert parked == (0, 0) and busy == 0


@pytest.mark.parametrize("after", [False, True], ids=["during", "right-after"])
async def test_a_cancel_while_the_request_is_being_resumed_ends_it_and_frees_everything(
    monkeypatch: pytest.MonkeyPatch, after: bool
) -> None:
    reader, other, parked, busy = await _cancel_inside(monkeypatch, "resume", after=after)
    assert other.stats.completion_tokens == 5
    assert reader.result is None or reader.result.done_reason == "cancel"
    assert parked == (0, 0) and busy == 0


# -- closing and draining ----------------------------------------------------------------------


@asynccontextmanager
async def _parked_runtime(
    max_tokens: int = 200, blocker_tokens: int = 60, **config: Any
) -> AsyncIterator[tuple[Runtime, Reader, ResponseStream, anyio.abc.TaskGroup]]:
    """One slot: a long request parked while a blocker holds the slot."""
    config.setdefault("memory_source", "none")
    async with anyio.create_task_group() as tg, open_runtime("fake", slots=1, fake=FAST, **config) as rt:
        reader = Reader(rt.generate(greedy("a long story", max_tokens=max_tokens)))
        tg.start_soon(reader.run)
        await wait_until(lambda: reader.tokens >= 3, 10)
        blocker = rt.generate(greedy("blocker", max_tokens=blocker_tokens))
        assert await rt.preempt(0)
        assert _parked(rt)[0] == 1
        yield rt, reader, blocker, tg


async def test_closing_the_runtime_with_a_parked_request_ends_its_stream_and_frees_it() -> None:
    async with _parked_runtime() as (rt, reader, _blocker, _):
        model = _model(rt)  # the blocker holds the slot as it closes
    with anyio.fail_after(10):
        await reader.ended.wait()
    assert isinstance(reader.error, RuntimeClosedError) and "while this request was preempted" in str(
        reader.error
    )
    assert "".join(c.text for c in reader.chunks)  # what it had sent stays sent
    assert model.preemption.statistics().parked == 0 and model.preemption.statistics().parked_bytes == 0


async def test_a_drain_lets_a_parked_request_resume_and_finish() -> None:
    async with _parked_runtime(max_tokens=40, blocker_tokens=10) as (rt, reader, blocker, _):
        blocker_reader = Reader(blocker)
        async with anyio.create_task_group() as tg:
            tg.start_soon(blocker_reader.run)
            cut = await rt.drain(10)
        assert cut == 0
        with anyio.fail_after(10):
            await reader.ended.wait()
        assert _parked(rt) == (0, 0)
    assert blocker_reader.result is not None and blocker_reader.result.stats.completion_tokens == 10
    assert reader.error is None and reader.result is not None
    assert reader.result.stats.completion_tokens == 40 and reader.result.stats.preemptions == 1


async def test_a_drain_that_runs_out_of_time_ends_a_parked_request_too() -> None:
    async with _parked_runtime(max_tokens=400, blocker_tokens=400) as (rt, reader, blocker, _):
        blocker_reader = Reader(blocker)
        async with anyio.create_task_group() as tg:
            tg.start_soon(blocker_reader.run)
            await wait_until(lambda: blocker_reader.tokens >= 1, 10)
            cut = await rt.drain(0.05, cancel_wait_s=5)
        with anyio.fail_after(10):
            await reader.ended.wait()
        assert cut == 2 and _parked(rt) == (0, 0)
    assert reader.result is None or reader.result.done_reason == "cancel"


# -- slow readers ------------------------------------------------------------------------------


async def test_a_reader_that_stopped_reading_is_preempted_and_still_gets_every_token() -> None:
    request = greedy("a story for a slow reader", max_tokens=120)
    plain = await _alone([request])
    async with open_runtime("fake", slots=1, memory_source="none", fake=FAST) as rt:
        stream = rt.generate(request)
        it = stream.__aiter__()
        first = await it.__anext__()
        await wait_until(lambda: _blocked(_ticket(stream)), 10)  # the caller fell behind
        other = rt.generate(greedy("while it is blocked", max_tokens=5))
        assert await rt.preempt(0)
        assert (await other.collect()).stats.completion_tokens == 5
        chunks = [first]
        async with stream:
            async for chunk in stream:
                chunks.append(chunk)
        assert _parked(rt) == (0, 0)
    assert "".join(c.text for c in chunks) == plain[0].text
    assert chunks[-1].stats is not None and chunks[-1].stats.preemptions == 1


# -- answers with state beyond the cells -------------------------------------------------------

STORY_SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 30}},
    "required": ["story"],
}


async def _midway(
    rt: Runtime, request: GenerateRequest, at: int, others: list[GenerateRequest]
) -> tuple[Reader, bool, list[Completion]]:
    """Run ``request`` in the one slot, park it by hand once ``at`` tokens came with ``others``
    waiting (they run first), and read everything to the end."""
    reader = Reader(rt.generate(request))
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader.run)
        await wait_until(lambda: reader.tokens >= at, 10)
        waiting = [rt.generate(r) for r in others]
        parked = await rt.preempt(0)
        done = [await stream.collect() for stream in waiting]
    return reader, parked, done


async def _answer_of(request: GenerateRequest, at: int) -> tuple[Completion, Completion, bool]:
    """``request`` alone, and preempted by hand after ``at`` tokens; and whether it was."""
    async with open_runtime("fake", slots=1, memory_source="none", fake=FAST) as rt:
        plain = await rt.complete(request)
        reader, parked, _ = await _midway(rt, request, at, [greedy("in between", max_tokens=4)])
        assert _parked(rt) == (0, 0)
    assert reader.result is not None and reader.error is None
    return plain, reader.result, parked


@pytest.mark.parametrize(
    ("request_", "at"),
    [
        (greedy("with logprobs", max_tokens=40, logprobs=True, top_logprobs=3), 10),
        (greedy("json please", max_tokens=60, format="json"), 3),
        (greedy("a schema", max_tokens=80, format=STORY_SCHEMA), 12),
        (GenerateRequest(prompt="sampled", max_tokens=80, temperature=0.9, seed=3, format=STORY_SCHEMA), 12),
        (
            GenerateRequest(prompt="penalised", max_tokens=50, temperature=0.7, seed=11, repeat_penalty=1.5),
            20,
        ),
    ],
    ids=["logprobs", "json", "schema", "schema-sampled", "seeded-penalty"],
)
async def test_an_answer_preempted_mid_way_is_the_one_never_preempted(
    request_: GenerateRequest, at: int
) -> None:
    plain, done, parked = await _answer_of(request_, at)
    assert parked and done.stats.preemptions == 1
    assert (done.text, done.token_ids, done.done_reason) == (plain.text, plain.token_ids, plain.done_reason)
    assert done.logprobs == plain.logprobs
    if request_.logprobs:
        assert len(done.logprobs) == 40 and all(len(lp.top) == 3 for lp in done.logprobs)


async def test_a_stop_string_held_back_across_the_pause_still_stops_the_answer() -> None:
    probe = greedy("stop me", max_tokens=60)
    (plain,) = await _alone([probe])
    stop = plain.text[30:33]  # parked while the start of the stop string may be held back
    request = greedy("stop me", max_tokens=60, stop=(stop,))
    parks = 0
    for at in (26, 28, 29, 30):
        want, done, parked = await _answer_of(request, at)
        parks += parked
        assert want.done_reason == "stop" and want.text == plain.text[: plain.text.index(stop)]
        assert (done.text, done.done_reason) == (want.text, want.done_reason), at
    assert parks >= 1


# -- choices, tenants, aging -------------------------------------------------------------------


async def test_the_choices_of_an_n_request_are_never_preempted() -> None:
    async with open_runtime("fake", slots=2, memory_source="none", fake=FAST) as rt:
        choices = rt.generate_choices(greedy("two ways", max_tokens=30, priority=-3), 2)
        got: list[Chunk] = []
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                async with choices:
                    async for chunk in choices:
                        got.append(chunk)

            tg.start_soon(read)
            await wait_until(lambda: len(got) >= 4, 10)
            assert not await rt.preempt(0) and not await rt.preempt(1)
            high = await rt.complete(greedy("urgent", max_tokens=3, priority=9))
        stats = rt.statistics().model.preemption
    assert stats is not None and stats.preemptions == 0
    assert high.stats.completion_tokens == 3
    assert sorted(sum(len(c.token_ids) for c in got if c.index == i) for i in (0, 1)) == [30, 30]


async def test_at_its_tenants_slot_cap_a_request_takes_the_place_of_its_own_tenants() -> None:
    async with open_runtime("fake", slots=2, memory_source="none", tenant_max_slots=1, fake=FAST) as rt:
        a = Reader(rt.generate(greedy("tenant a story", max_tokens=150, tenant="a")))
        b = Reader(rt.generate(greedy("tenant b story", max_tokens=150, tenant="b")))
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run)
            await wait_until(lambda: a.tokens >= 1, 10)
            tg.start_soon(b.run)
            await wait_until(lambda: b.tokens >= 1, 10)
            high = await rt.complete(greedy("urgent for a", max_tokens=5, priority=5, tenant="a"))
            sent_a, sent_b = a.tokens, b.tokens
        stats = rt.statistics().model.preemption
    assert high.stats.completion_tokens == 5
    assert a.result is not None and b.result is not None
    assert sent_a < 150  # a gave way to its own tenant's urgent request
    assert a.result.stats.preemptions == 1 and b.result.stats.preemptions == 0
    assert stats is not None and stats.preemptions == 1 and sent_b >= 0


async def test_a_preempted_request_does_not_come_back_first_by_aging_its_running_time() -> None:
    low = greedy("low priority story", max_tokens=120, priority=-1)
    async with open_runtime("fake", slots=1, memory_source="none", queue_aging_s=0.01, fake=FAST) as rt:
        reader = Reader(rt.generate(low))
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await wait_until(lambda: reader.tokens >= 10, 10)  # it has run past queue_aging_s
            high = await rt.complete(greedy("urgent", max_tokens=5, priority=5))
            sent = reader.tokens
    assert high.stats.completion_tokens == 5
    assert reader.result is not None and reader.result.stats.preemptions == 1
    assert sent < 120  # the urgent one did not wait behind the whole low answer


# -- the queue's part, pure --------------------------------------------------------------------


class _Req:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_a_requeued_request_waits_from_its_requeue_and_its_tenant_is_charged_once() -> None:
    q: FairQueue[_Req] = FairQueue(QueuePolicy(aging_s=10.0))
    run = _Req("run")
    q.push([run], Placement(tenant="a"), now_s=0.0)
    assert q.pop(0.0) is run  # tenant a is charged 1
    older = _Req("older")
    q.push([older], Placement(tenant="b"), now_s=5.0)
    q.requeue(run, 30.0)  # it ran 30 s: that was no wait
    a2, b2 = _Req("a2"), _Req("b2")
    q.push([a2], Placement(tenant="a"), now_s=31.0)
    q.push([b2], Placement(tenant="b"), now_s=31.0)
    assert q.pop(31.0) is older  # aged (26 s waiting); the requeued one is not
    assert q.order(31.0) == [run, a2, b2]  # a was refunded: run first (its lane's head)
    assert drain_by_pop(q, 31.0) == [run, a2, b2]
    q2: FairQueue[_Req] = FairQueue(QueuePolicy())
    first, behind = _Req("first"), _Req("behind")
    q2.push([first], Placement(), now_s=0.0)
    assert q2.pop(0.0) is first
    q2.push([behind], Placement(), now_s=1.0)
    q2.requeue(first, 2.0, last=True)
    assert drain_by_pop(q2, 2.0) == [behind, first] and q2.running("") == 2


def drain_by_pop(q: FairQueue[_Req], now_s: float) -> list[_Req]:
    out = []
    while (r := q.pop(now_s)) is not None:
        out.append(r)
    return out


async def test_a_mailbox_closed_for_a_drain_still_hands_out_what_it_keeps_then_ends() -> None:
    mailbox: Mailbox[_Req] = Mailbox(8)
    kept, refused = _Req("kept"), _Req("refused")
    mailbox.put_nowait(refused)
    mailbox.put_nowait(kept)
    receivers = [mailbox.receiver(), mailbox.receiver()]
    left = mailbox.close(lambda: RuntimeClosedError("closing"), keep=lambda r: r is kept)
    assert left == [refused] and mailbox.statistics().depth == 1
    with pytest.raises(RuntimeClosedError):
        mailbox.put_nowait(_Req("new"))
    with anyio.fail_after(5):
        assert await receivers[0].receive() is kept
        with pytest.raises(anyio.EndOfStream):
            await receivers[1].receive()
        assert not mailbox.requeue(kept)  # closed: a slot serves it on where it is


# -- resize, a failing restore, a crash --------------------------------------------------------


@pytest.mark.parametrize("to_slots", [1, 3], ids=["shrink", "grow"])
async def test_a_resize_while_a_request_is_parked_keeps_it_exact(to_slots: int) -> None:
    long = greedy("parked across a resize", max_tokens=60)
    first = greedy("slot zero's own", max_tokens=30)
    blocker = greedy("takes slot one", max_tokens=20)
    plain = await _alone([long, first, blocker])
    async with open_runtime("fake", slots=2, memory_source="none", prefix_cache=False, fake=FAST) as rt:
        readers = [Reader(rt.generate(first))]
        async with anyio.create_task_group() as tg:
            tg.start_soon(readers[0].run)
            await wait_until(lambda: readers[0].tokens >= 1, 10)
            readers.append(Reader(rt.generate(long)))
            tg.start_soon(readers[1].run)
            await wait_until(lambda: readers[1].tokens >= 5, 10)
            readers.append(Reader(rt.generate(blocker)))
            tg.start_soon(readers[2].run)
            assert await rt.preempt(1)
            record = await rt.resize(to_slots)
            assert record is not None and record.to_slots == to_slots
        assert _parked(rt) == (0, 0) and rt.status().slots_effective == to_slots
    for reader, want in zip(readers, [first, long, blocker], strict=True):
        assert reader.error is None and reader.result is not None
        assert reader.result.text == plain[[long, first, blocker].index(want)].text
    assert readers[1].result is not None and readers[1].result.stats.preemptions == 1


async def test_a_request_whose_state_cannot_be_restored_fails_alone_and_the_slot_serves_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _parked_runtime(blocker_tokens=10) as (rt, reader, blocker, _):

        def refuse(seq_id: int, state: bytes) -> None:
            raise RuntimeError(f"no room for {len(state)} bytes in sequence {seq_id}")

        monkeypatch.setattr(rt.backend, "load_seq", refuse)
        assert (await blocker.collect()).stats.completion_tokens == 10  # then the parked one resumes
        with anyio.fail_after(10):
            await reader.ended.wait()
        monkeypatch.undo()
        after = await rt.complete(greedy("after the failure", max_tokens=6))
        stats = rt.statistics().model.preemption
        status = rt.status()
    assert isinstance(reader.error, GenerationError) and "could not resume" in str(reader.error)
    assert after.stats.completion_tokens == 6
    assert stats is not None and (stats.failed_resumes, stats.parked, stats.parked_bytes) == (1, 0, 0)
    assert status.restarts == 0 and status.state == "ready"


async def test_the_slot_that_parked_a_request_crashing_does_not_lose_it() -> None:
    long = greedy("a long story", max_tokens=60)
    (plain,) = await _alone([long])
    fake = {"step_delay_s": STEP_S, "fault_prompts": ["boom"], "fault_after": 3}
    async with open_runtime("fake", slots=1, memory_source="none", restart_intensity=3, fake=fake) as rt:
        reader = Reader(rt.generate(long))
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await wait_until(lambda: reader.tokens >= 5, 10)
            boom = rt.generate(greedy("boom", max_tokens=20))
            assert await rt.preempt(0)
            with pytest.raises(GenerationError):  # the slot crashed on it (SlotFailedError)
                await boom.collect()
        status = rt.status()
        assert _parked(rt) == (0, 0)
    assert status.restarts == 1 and status.state == "ready"
    assert reader.error is None and reader.result is not None and reader.result.text == plain.text


# -- HTTP --------------------------------------------------------------------------------------


async def test_an_ollama_stream_of_low_priority_pauses_for_an_urgent_request_and_ends_exact() -> None:
    body = {"model": "fake", "prompt": "a low priority story", "stream": True,
            "options": {"temperature": 0, "num_predict": 80}}  # fmt: skip
    urgent = {
        "model": "fake",
        "prompt": "urgent",
        "stream": False,
        "options": {"temperature": 0, "num_predict": 5},
    }
    async with open_runtime("fake", slots=1, memory_source="none", fake=FAST) as rt:
        app = create_app(rt)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as client:
            plain = (await client.post("/api/generate", json={**body, "stream": False})).json()
            lines: list[dict[str, Any]] = []
            async with anyio.create_task_group() as tg:

                async def stream_low() -> None:
                    headers = {"x-slotserve-priority": "-1"}
                    async with client.stream("POST", "/api/generate", json=body, headers=headers) as r:
                        async for line in r.aiter_lines():
                            if line:
                                lines.append(json.loads(line))

                tg.start_soon(stream_low)
                await wait_until(lambda: rt.statistics().model.tokens_sampled >= 90, 10)  # 10 of its 80
                r = await client.post("/api/generate", json=urgent, headers={"x-slotserve-priority": "5"})
                assert r.status_code == 200 and r.json()["eval_count"] == 5
        stats = rt.statistics().model.preemption
    assert stats is not None and stats.preemptions == 1 and stats.parked == 0
    assert lines[-1]["done"] and lines[-1]["eval_count"] == 80
    assert "".join(line["response"] for line in lines) == plain["response"]


async def test_a_storm_of_preempts_and_cancels_at_random_moments_ends_every_stream_and_frees_all() -> None:
    import random

    rng = random.Random(20261202)
    requests = [
        greedy(f"storm {i}", max_tokens=rng.randint(5, 40), priority=rng.randint(-2, 2)) for i in range(30)
    ]
    plain = await _alone(requests, prefix_cache=False)
    async with open_runtime("fake", slots=3, memory_source="none", max_queue=64, fake=FAST) as rt:
        readers: list[Reader] = []
        async with anyio.create_task_group() as tg:
            for request in requests:
                reader = Reader(rt.generate(request))
                readers.append(reader)
                tg.start_soon(reader.run)
                for _ in range(rng.randint(0, 3)):
                    await anyio.sleep(rng.choice([0, 0.001, 0.004]))
                    action = rng.random()
                    if action < 0.4:
                        tg.start_soon(rt.preempt, rng.randrange(3))
                    elif action < 0.6:
                        victim = rng.choice(readers)
                        _ticket(victim.stream).cancel()
        with anyio.fail_after(10):
            for reader in readers:
                await reader.ended.wait()
            await wait_until(lambda: rt.status().requests_in_flight == 0, 10)
        stats = rt.statistics().model.preemption
        status = rt.status()
    assert stats is not None and stats.preemptions >= 1 and (stats.parked, stats.parked_bytes) == (0, 0)
    assert stats.resumes + stats.failed_resumes <= stats.preemptions and stats.failed_resumes == 0
    assert status.slots_busy == 0 and status.queue_depth == 0 and status.requests_failed == 0
    for reader in readers:
        assert reader.error is None, reader.error
        if reader.result is None or reader.result.done_reason == "cancel":
            assert _ticket(reader.stream).cancelled  # (one cancelled unstarted just ends)
        else:
            assert reader.result.text == plain[readers.index(reader)].text
    assert sum(r.result is not None and r.result.done_reason == "length" for r in readers) >= 10


# -- llama.cpp ---------------------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_llama_cpp_a_sampled_constrained_answer_resumed_in_another_slot_is_unchanged() -> None:
    require_backend("llama_cpp")
    request = ChatRequest(
        messages=(ChatMessage(role="user", content="Describe a lighthouse as JSON."),),
        max_tokens=48, temperature=0.8, seed=5, format=STORY_SCHEMA,
    )  # fmt: skip
    async with open_runtime(
        "llama_cpp", slots=2, n_ctx_per_slot=256, memory_source="none", prefix_cache=False
    ) as rt:
        plain = await rt.complete(request)
        reader = Reader(rt.chat(request))
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await wait_until(lambda: reader.tokens >= 8, 60)
            short = rt.generate(greedy("The capital of France is", max_tokens=4))
            await wait_until(lambda: rt.status().slots_busy == 2, 60)
            waiting = rt.generate(greedy("Once upon a time", max_tokens=24))
            assert await rt.preempt(_slot_of(rt, reader.stream))  # the other slot frees first
            await short.collect()
            await waiting.collect()
        assert _parked(rt) == (0, 0)
    assert reader.error is None and reader.result is not None
    assert reader.result.stats.preemptions == 1
    assert (reader.result.text, reader.result.token_ids) == (plain.text, plain.token_ids)
    assert plain.text.replace(" ", "").startswith('{"story":"') and len(plain.token_ids) > 20


async def test_a_request_whose_park_meets_a_drain_goes_on_in_its_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = greedy("parked as the drain begins", max_tokens=60)
    (plain,) = await _alone([request])
    original = ModelActor.pause
    drains: list[int] = []

    async with open_runtime("fake", slots=1, memory_source="none", fake=FAST) as rt:

        async def pause_then_drain(self: ModelActor, job: Any) -> Any:
            out = await original(self, job)
            tg.start_soon(lambda: _drain(rt, drains))
            await wait_until(lambda: rt.state == "draining", 10)
            return out

        monkeypatch.setattr(ModelActor, "pause", pause_then_drain)
        reader = Reader(rt.generate(request))
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await wait_until(lambda: reader.tokens >= 5, 10)
            waiting = rt.generate(greedy("refused by the drain", max_tokens=5))
            assert not await rt.preempt(0)  # the mailbox closed meanwhile: it went on here
            with pytest.raises(RuntimeClosedError):
                await waiting.collect()
            monkeypatch.undo()
            assert not await rt.preempt(0)  # draining: nowhere to park it
        assert _parked(rt) == (0, 0)
    assert drains == [0]
    assert reader.error is None and reader.result is not None
    assert reader.result.text == plain.text and reader.result.stats.preemptions == 0


async def _drain(rt: Runtime, into: list[int]) -> None:
    into.append(await rt.drain(10))


async def test_an_ask_whose_waiting_request_found_a_slot_first_parks_nothing() -> None:
    async with open_runtime("fake", slots=1, memory_source="none", fake=FAST) as rt:
        reader = Reader(rt.generate(greedy("asked for nothing", max_tokens=30, priority=-1)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await wait_until(lambda: reader.tokens >= 3, 10)
            run = _ticket(reader.stream).serving
            assert run is not None and run.ask(
                for_priority=0
            )  # as the admission asks, for a request gone since
            assert not await run.decided()
            same = Reader(rt.generate(greedy("same priority", max_tokens=3, priority=-1)))
            tg.start_soon(same.run)
            assert (
                run.ask(for_priority=0) and not await run.decided()
            )  # one of a lower priority waits: no cause
        stats = rt.statistics().model.preemption
    assert stats is not None and stats.preemptions == 0
    assert reader.result is not None and reader.result.stats.preemptions == 0
    assert same.result is not None and same.result.stats.completion_tokens == 3


async def test_an_openai_stream_of_low_priority_pauses_for_an_urgent_request_and_ends_exact() -> None:
    body = {"model": "fake", "prompt": "a low priority story", "max_tokens": 80, "temperature": 0}
    async with open_runtime("fake", slots=1, memory_source="none", fake=FAST) as rt:
        app = create_app(rt)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as client:
            plain = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            events: list[dict[str, Any]] = []
            async with anyio.create_task_group() as tg:

                async def stream_low() -> None:
                    headers = {"x-slotserve-priority": "-1"}
                    async with client.stream(
                        "POST", "/v1/completions", json={**body, "stream": True}, headers=headers
                    ) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                events.append(json.loads(line.removeprefix("data: ")))

                tg.start_soon(stream_low)
                await wait_until(lambda: rt.statistics().model.tokens_sampled >= 90, 10)  # 10 of its 80
                urgent = {**body, "prompt": "urgent", "max_tokens": 5}
                r = await client.post("/v1/completions", json=urgent, headers={"x-slotserve-priority": "5"})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        stats = rt.statistics().model.preemption
    assert stats is not None and stats.preemptions == 1 and stats.parked == 0
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events) == plain


async def test_when_the_latest_started_has_no_token_yet_the_next_lowest_gives_way() -> None:
    async with open_runtime(
        "fake", slots=2, memory_source="none", n_batch=8, prefill_budget_tokens=8, fake=FAST
    ) as rt:
        running = Reader(rt.generate(greedy("running a while", max_tokens=150, priority=-1)))
        evaluating = Reader(rt.generate(greedy("p" * 300, max_tokens=150, priority=-1)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(running.run)
            await wait_until(lambda: running.tokens >= 1, 10)
            tg.start_soon(evaluating.run)
            await wait_until(lambda: rt.status().slots_busy == 2, 10)
            high = await rt.complete(greedy("urgent", max_tokens=5, priority=5))
            sent = (running.tokens, evaluating.tokens)
    assert high.stats.completion_tokens == 5
    assert sent[0] < 150 and sent[1] < 150  # it did not wait for either to end
    assert running.result is not None and evaluating.result is not None
    assert running.result.stats.preemptions + evaluating.result.stats.preemptions == 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["fake", "llama_cpp"])
async def test_a_request_parked_with_nothing_waiting_resumes_at_once_on_its_own_cells(kind: str) -> None:
    request = greedy("The capital of France is", max_tokens=24)
    async with open_runtime(kind, slots=1, n_ctx_per_slot=256, memory_source="none", fake=FAST) as rt:
        plain = await rt.complete(request)
        reader = Reader(rt.generate(request))
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run)
            await wait_until(lambda: reader.tokens >= 4, 60)
            assert await rt.preempt(0)  # it gives way to nobody: its slot takes it straight back
            await wait_until(lambda: _ticket(reader.stream).serving is not None or reader.ended.is_set(), 60)
            assert await rt.preempt(0) or reader.ended.is_set()  # and again, once it runs
        stats = rt.statistics().model.preemption
    assert stats is not None and stats.resumes == stats.preemptions >= 1 and stats.parked == 0
    assert reader.result is not None and reader.result.token_ids == plain.token_ids


async def test_a_request_of_n_choices_above_them_has_as_many_give_way() -> None:
    async with open_runtime("fake", slots=2, memory_source="none", fake=FAST) as rt:
        lows = [Reader(rt.generate(greedy(f"low {i}", max_tokens=150, priority=-1))) for i in range(2)]
        async with anyio.create_task_group() as tg:
            for reader in lows:
                tg.start_soon(reader.run)
            await wait_until(lambda: all(r.tokens >= 1 for r in lows), 10)
            choices = rt.generate_choices(greedy("urgent twice", max_tokens=5, priority=5), 2)
            got: list[Chunk] = []
            async with choices:
                async for chunk in choices:
                    got.append(chunk)
            sent = [r.tokens for r in lows]
    assert sorted(sum(len(c.token_ids) for c in got if c.index == i) for i in (0, 1)) == [5, 5]
    assert all(n < 150 for n in sent)  # neither choice waited for a low answer to end
    assert all(r.result is not None and r.result.stats.preemptions == 1 for r in lows)


@pytest.mark.timeout(300)
async def test_llama_cpp_closing_with_a_sampled_request_parked_frees_it_and_ends_its_stream() -> None:
    require_backend("llama_cpp")
    request = GenerateRequest(prompt="Once upon a time", max_tokens=200, temperature=0.8, seed=1)
    async with anyio.create_task_group() as tg:
        async with open_runtime("llama_cpp", slots=1, n_ctx_per_slot=256, memory_source="none") as rt:
            model = _model(rt)
            reader = Reader(rt.generate(request))
            tg.start_soon(reader.run)
            await wait_until(lambda: reader.tokens >= 3, 60)
            blocker = Reader(rt.generate(GenerateRequest(prompt="The sea", max_tokens=200, temperature=0.7)))
            tg.start_soon(blocker.run)
            assert await rt.preempt(0)
            await wait_until(lambda: blocker.tokens >= 1, 60)  # the blocker holds the slot as it closes
        with anyio.fail_after(30):
            await reader.ended.wait()
            await blocker.ended.wait()
    assert isinstance(reader.error, RuntimeClosedError)
    assert (model.preemption.statistics().parked, model.preemption.statistics().parked_bytes) == (0, 0)
