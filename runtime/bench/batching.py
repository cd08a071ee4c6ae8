"""Sections 1 and 2 side by side: the plain batched loop against slotserve's embedded API.

For each N both are loaded at once (the same model file, the same context shape) and run in
turns, ``repeats`` rounds, the order swapped every round, so that a change in the machine's
load between two measurements touches both. The figures of each are those of its median
round; the ratio is the median of the rounds' ratios (slotserve's tok/s over the plain
loop's, measured a few seconds apart), which a slow drift of the load does not bias.
"""

from __future__ import annotations

import logging
from statistics import median
from typing import Any

import anyio
import msgspec

from runtime.backends.llama_cpp import gpu_offload_supported
from runtime.backends.model_files import resolve_model
from runtime.bench.embedded import embedded_config, run_embedded
from runtime.bench.plain import PlainLoop
from runtime.bench.workload import PassFigures, Workload, median_pass, prompts
from runtime.core.sizing import probe_for
from runtime.runtime import Runtime

__all__ = ["BatchingRow", "measure_batching"]

log = logging.getLogger("slotserve.bench")


class BatchingRow(msgspec.Struct, frozen=True, kw_only=True):
    """One N: the plain loop's figures, slotserve's, and slotserve's share of the plain loop."""

    n: int
    plain: PassFigures | None
    slotserve: PassFigures | None
    ratio: float | None
    """slotserve tok/s over the plain loop's, the median of the rounds; None unless both ran."""
    round_ratios: list[float]
    """The same ratio in each round (the spread shows the noise)."""
    same_tokens: float | None
    """Share of sequences whose tokens were the same in both (greedy; batch shapes differ)."""
    kv_bytes_per_slot: int
    memory_source: str | None
    memory_used_bytes: int | None
    """Memory the runtime took on its device (NVML for a GPU, else the host), as read before
    and after it loaded; None without a probe."""


async def _used_bytes(probe: Any) -> tuple[int, str] | None:
    if probe is None:
        return None
    reading = await anyio.to_thread.run_sync(probe.read)
    if reading is None or reading.used_bytes is None:
        return None
    return reading.used_bytes, f"{reading.source} {reading.device}"


async def _row(workload: Workload, n: int, plain_on: bool, slotserve_on: bool) -> BatchingRow:
    path = resolve_model(workload.model)
    texts = prompts(n)
    cfg = embedded_config(workload, n)
    on_gpu = workload.gpu_layers != 0 and gpu_offload_supported()
    probe = probe_for(msgspec.structs.replace(cfg, memory_source="auto"), 1 if on_gpu else 0)
    before = await _used_bytes(probe)
    plain_passes: list[PassFigures] = []
    slot_passes: list[PassFigures] = []
    ratios: list[float] = []
    same: float | None = None
    async with Runtime(cfg, probe=None) as rt:
        after = await _used_bytes(probe)
        loop = await anyio.to_thread.run_sync(PlainLoop, path, n, workload) if plain_on else None
        try:
            tokens = [loop.tokenize(t) for t in texts] if loop else []
            if loop:
                await anyio.to_thread.run_sync(loop.run, tokens, 4)  # warm up: caches, threads
            if slotserve_on:
                await run_embedded(rt, texts, 4)
            for r in range(workload.repeats):
                order = ("plain", "slotserve") if r % 2 == 0 else ("slotserve", "plain")
                got: dict[str, tuple[PassFigures, list[list[int]]]] = {}
                for which in order:
                    if which == "plain" and loop is not None:
                        got[which] = await anyio.to_thread.run_sync(loop.run, tokens, workload.max_tokens)
                    elif which == "slotserve" and slotserve_on:
                        got[which] = await run_embedded(rt, texts, workload.max_tokens)
                if "plain" in got:
                    plain_passes.append(got["plain"][0])
                if "slotserve" in got:
                    slot_passes.append(got["slotserve"][0])
                if len(got) == 2:
                    ratios.append(got["slotserve"][0].tokens_per_s / got["plain"][0].tokens_per_s)
                    a, b = got["plain"][1], got["slotserve"][1]
                    same = sum(x == y for x, y in zip(a, b, strict=True)) / n
                log.info("N=%d round %d: %s", n, r, {k: round(v[0].tokens_per_s, 1) for k, v in got.items()})
        finally:
            if loop is not None:
                await anyio.to_thread.run_sync(loop.close)
        kv = rt.backend.info.kv_bytes_per_slot
    plain = median_pass(plain_passes) if plain_passes else None
    slot = median_pass(slot_passes) if slot_passes else None
    used = None if before is None or after is None else after[0] - before[0]
    return BatchingRow(
        n=n,
        plain=plain,
        slotserve=slot,
        ratio=median(ratios) if ratios else None,
        round_ratios=ratios,
        same_tokens=same,
        kv_bytes_per_slot=kv,
        memory_source=after[1] if after else None,
        memory_used_bytes=used,
    )


async def measure_batching(
    workload: Workload, n_list: tuple[int, ...], *, plain: bool = True, slotserve: bool = True
) -> list[BatchingRow]:
    """Run section 1 (``plain``) and section 2 (``slotserve``) at every N of ``n_list``.

    :raises ModelLoadError: if the model cannot be loaded.
    """
    return [await _row(workload, n, plain, slotserve) for n in n_list]
