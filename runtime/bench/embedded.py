"""Section 2: slotserve's embedded API at N slots, on the workload of the plain loop.

N requests are admitted at once and read as streams by N tasks, as an application embedding
slotserve would; TTFT and ITL are measured where the caller sees the chunks.
"""

from __future__ import annotations

import time

import anyio

from runtime.bench.workload import PassFigures, Workload
from runtime.core.config import RuntimeConfig
from runtime.core.messages import GenerateRequest
from runtime.runtime import Runtime

__all__ = ["embedded_config", "run_embedded"]


def embedded_config(workload: Workload, slots: int) -> RuntimeConfig:
    """The RuntimeConfig of the workload at ``slots`` slots: memory sizing off (the slot count
    is the one asked for) and no prefix cache (every pass evaluates its prompts in full, as the
    plain loop does)."""
    return RuntimeConfig(
        model=workload.model,
        slots=slots,
        max_queue=max(16, slots),
        n_ctx_per_slot=workload.n_ctx_per_slot,
        n_batch=workload.n_batch,
        threads=workload.threads,
        n_gpu_layers=workload.gpu_layers,
        memory_source="none",
        prefix_cache=False,
    )


async def run_embedded(
    rt: Runtime, prompts: list[str], max_tokens: int
) -> tuple[PassFigures, list[list[int]]]:
    """Stream one greedy request per prompt, all at once.

    :returns: the figures (TTFT from the moment the requests were admitted) and each
        request's token ids.
    :raises SlotserveError: if a request fails.
    """
    ttft: list[float] = []
    itl: list[float] = []
    tokens: list[list[int]] = [[] for _ in prompts]

    async def one(i: int, start: float) -> None:
        request = GenerateRequest(prompt=prompts[i], max_tokens=max_tokens, temperature=0)
        last: float | None = None
        async with rt.generate(request, admission_timeout_s=600) as stream:
            async for chunk in stream:
                if not chunk.token_ids:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - start)
                else:
                    itl.extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
                last = now
                tokens[i].extend(chunk.token_ids)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i, start)
    wall = time.perf_counter() - start
    return PassFigures.of(len(prompts), sum(len(t) for t in tokens), wall, ttft, itl), tokens
