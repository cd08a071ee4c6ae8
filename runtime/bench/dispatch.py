"""Section 4, our cost per token: slotserve on the fake backend with zero compute time.

Every token goes the whole way (mailbox, slot, step loop and its worker thread, sampling
bookkeeping, detokenizing, the Chunk to the caller's stream) while the model itself costs
nothing, so tokens per second here is the most the runtime can carry. The fake's own step
(a few lines of Python per token) runs too; its time is measured and reported apart.
"""

from __future__ import annotations

import asyncio
import time
from statistics import median

import anyio
import msgspec
import numpy as np
from prometheus_client import CollectorRegistry

from runtime.backends.base import StepPlan, StepResult
from runtime.backends.fake import FakeBackend
from runtime.core.config import RuntimeConfig
from runtime.core.messages import GenerateRequest
from runtime.runtime import Runtime

__all__ = ["DispatchFigures", "measure_dispatch", "stream_all"]


class DispatchFigures(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens per second through the whole path with a free model (median of the passes)."""

    slots: int
    tokens_per_pass: int
    passes: int
    tokens_per_s: float
    """Generated tokens per second of wall time, all slots together."""
    us_per_token: float
    """Wall microseconds per token: the runtime's cost per token (and the fake's)."""
    fake_step_share: float
    """Share of the wall time spent inside the fake backend's own step (the test double)."""
    tokens_per_s_without_fake: float
    """Tokens per second of the wall time less the fake's own step time."""
    steps_per_s: float
    cpu_per_wall: float
    """Process CPU seconds per wall second (above 1: the worker thread overlapped the loop)."""
    tokens_per_cpu_s: float
    """Tokens per second of this process's CPU time: the cost per token with the time other
    processes took from the cores left out (on a shared machine it varies less than wall time)."""
    all_tokens_per_s: list[float]
    floor_tokens_per_s: float
    """The floor, measured in turns with the passes (median): one task hands a token to each of
    ``slots`` reader tasks per step through an asyncio.Queue and yields once a step; the least
    any asyncio runtime does to stream tokens to concurrent readers."""
    share_of_floor: float
    """tokens_per_s over floor_tokens_per_s, the median of the passes' ratios: what the shared
    machine's speed does to both cancels out."""


_TEXT = np.array([1 + c for c in b"lorem ipsum dolor sit amet "], dtype=np.int32)
"""Token ids of the fake (byte + 1) of the text the free model writes."""


class _FreeModel(FakeBackend):
    """The fake backend with a free step: each sequence's next token is a letter picked by
    its position, in two numpy operations; no KV bookkeeping and no per-token Python. The
    time of its steps (seconds) is kept, and reported apart."""

    step_seconds = 0.0

    def step(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        rows = plan.output_rows
        tokens = _TEXT[(plan.positions[rows] + plan.seq_ids[rows]) % len(_TEXT)]
        self.step_seconds += time.perf_counter() - start
        return StepResult(tokens=tokens)


async def stream_all(rt: Runtime, slots: int, max_tokens: int) -> int:
    """``slots`` greedy requests of ``max_tokens`` tokens at once, each read as a stream;
    returns the tokens that came."""
    counts = [0] * slots

    async def one(i: int) -> None:
        request = GenerateRequest(prompt=f"request {i}", max_tokens=max_tokens, temperature=0)
        async with rt.generate(request) as stream:
            async for chunk in stream:
                counts[i] += len(chunk.token_ids)

    async with anyio.create_task_group() as tg:
        for i in range(slots):
            tg.start_soon(one, i)
    return sum(counts)


async def _floor_pass(slots: int, max_tokens: int) -> float:
    """Tokens per second of the floor (see DispatchFigures.floor_tokens_per_s)."""
    queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(slots)]

    async def reader(queue: asyncio.Queue[int]) -> None:
        for _ in range(max_tokens):
            await queue.get()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for queue in queues:
            tg.start_soon(reader, queue)
        for token in range(max_tokens):
            for queue in queues:
                queue.put_nowait(token)
            await asyncio.sleep(0)
    return slots * max_tokens / (time.perf_counter() - start)


async def measure_dispatch(slots: int = 8, max_tokens: int = 2000, passes: int = 3) -> DispatchFigures:
    """Run ``passes`` passes of ``slots`` concurrent greedy requests of ``max_tokens`` tokens
    each on a fake backend with zero step delay; return the figures of the median pass."""
    n_ctx = max_tokens + 64
    fake = _FreeModel(n_seq_max=slots, n_ctx_per_slot=n_ctx)
    config = RuntimeConfig(
        backend="fake", slots=slots, n_ctx_per_slot=n_ctx, max_tokens_cap=max_tokens,
        memory_source="none", prefix_cache=False,
    )  # fmt: skip
    rows: list[tuple[float, float, float, float, int]] = []
    floors: list[float] = []
    async with Runtime(config, backend=fake, registry=CollectorRegistry(), probe=None) as rt:
        await stream_all(rt, slots, 16)  # warm up
        for _ in range(passes):
            floors.append(await _floor_pass(slots, max_tokens))
            fake.step_seconds = 0.0
            steps = rt.statistics().model.steps
            cpu, start = time.process_time(), time.perf_counter()
            tokens = await stream_all(rt, slots, max_tokens)
            wall = time.perf_counter() - start
            cpu = time.process_time() - cpu
            n_steps = rt.statistics().model.steps - steps
            rows.append((tokens / wall, fake.step_seconds / wall, cpu / wall, n_steps / wall, tokens))
    ranked = sorted(rows)
    tok_s, fake_share, cpu_share, steps_s, tokens = ranked[(len(ranked) - 1) // 2]
    return DispatchFigures(
        slots=slots,
        tokens_per_pass=tokens,
        passes=passes,
        tokens_per_s=tok_s,
        us_per_token=1e6 / tok_s,
        fake_step_share=fake_share,
        tokens_per_s_without_fake=tok_s / (1 - fake_share) if fake_share < 1 else 0.0,
        steps_per_s=steps_s,
        cpu_per_wall=cpu_share,
        tokens_per_cpu_s=tok_s / cpu_share if cpu_share > 0 else 0.0,
        all_tokens_per_s=[r[0] for r in rows],
        floor_tokens_per_s=median(floors),
        share_of_floor=median(r[0] / f for r, f in zip(rows, floors, strict=True)),
    )
