"""Preemption by snapshot under attack: storms of priorities, cancels at every moment, a close
or a drain with requests parked, slow readers, constrained and sampled answers, choices, tenant
caps, aging, a resize, a failing restore, and an HTTP stream that pauses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from actors.model import ModelActor
from runtime import Runtime
from runtime.core.errors import RuntimeClosedError
from runtime.core.messages import Chunk, Completion, CompletionBuilder, GenerateRequest
from runtime.core.ticket import ResponseStream, Ticket
from tests.helpers import greedy, open_runtime, wait_until

STEP_S = 0.003
FAST = {"step_delay_s": STEP_S}


def _ticket(stream: ResponseStream) -> Ticket:
    return stream._ticket


def _model(rt: Runtime) -> ModelActor:
    model = rt._model
    assert model is not None
    return model


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
    async with _parked_runtime() as (rt, reader, blocker, _):
        model = _model(rt)
        await blocker.aclose()
    with anyio.fail_after(10):
        await reader.ended.wait()
    assert isinstance(reader.error, RuntimeClosedError) or (
        reader.result is not None and reader.result.done_reason == "cancel"
    )
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
