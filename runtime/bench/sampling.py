"""What llama.cpp's sampler chain costs a step (printed with section 2).

One context of 2N sequences: the first N greedy (one argmax over their logits), the other N
with the default chain of a request at temperature 0.8 (repeat penalty, top-k, top-p,
temperature, seeded dist). Steps of the two halves alternate, each decoding N rows at the same
positions; the backend's own clock of the time spent choosing tokens (``sampling_seconds``)
gives each step's choosing apart from its decode, whose noise is far larger.
"""

from __future__ import annotations

import statistics
import time

import msgspec
import numpy as np

from runtime.backends.base import SamplerSpec, StepPlan
from runtime.backends.llama_cpp import LlamaCppBackend
from runtime.backends.model_files import resolve_model
from runtime.bench.workload import Workload
from runtime.core.config import RuntimeConfig

__all__ = ["SamplingFigures", "measure_sampling"]

DEFAULT_CHAIN = SamplerSpec(
    temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.1, repeat_last_n=64, seed=7
)
"""What a request gets without sampling options (GenerateRequest's defaults)."""


class SamplingFigures(msgspec.Struct, frozen=True, kw_only=True):
    n: int
    steps: int
    decode_step_s: float
    """Median step of N rows, all of it (decode and choosing)."""
    argmax_step_s: float
    """Median time a step of N greedy rows spent choosing: one argmax."""
    chain_step_s: float
    """Median time a step of N rows with the default chain spent choosing."""
    chain_per_row_us: float
    """``chain_step_s / n`` in microseconds."""


def _plan(tokens: list[int], positions: list[int], seqs: list[int], outputs: list[int]) -> StepPlan:
    return StepPlan(
        tokens=np.array(tokens, dtype=np.int32),
        positions=np.array(positions, dtype=np.int32),
        seq_ids=np.array(seqs, dtype=np.int32),
        output_rows=np.array(outputs, dtype=np.int32),
        trims=[],
        samplers={},
        n_prompt_tokens=0,
        n_sequences=len(set(seqs)),
    )


def measure_sampling(workload: Workload, n: int = 8, steps: int = 32) -> SamplingFigures:
    """Decode ``steps`` steps of each half, alternating (blocking: it loads the model); times
    in seconds.

    :raises ModelLoadError: if the workload's model cannot be loaded.
    :raises RuntimeError: if llama_decode fails.
    """
    config = RuntimeConfig(
        slots=2 * n, n_ctx_per_slot=workload.n_ctx_per_slot, threads=workload.threads,
        n_gpu_layers=workload.gpu_layers, memory_source="none",
    )  # fmt: skip
    backend = LlamaCppBackend(resolve_model(workload.model), config, n_seq=2 * n)
    try:
        prompt = backend.tokenize(
            "Once upon a time, in a quiet village,", add_special=True, parse_special=False
        )
        halves = (list(range(n)), list(range(n, 2 * n)))
        last: dict[int, list[int]] = {}
        for half, members in enumerate(halves):  # each half's prompts in one prefill
            tokens: list[int] = []
            positions: list[int] = []
            seqs: list[int] = []
            outputs: list[int] = []
            for seq in members:
                tokens += prompt
                positions += range(len(prompt))
                seqs += [seq] * len(prompt)
                outputs.append(len(tokens) - 1)
            prefill = _plan(tokens, positions, seqs, outputs)
            prefill.samplers = dict.fromkeys(members, DEFAULT_CHAIN if half else None)
            last[half] = backend.step(prefill).tokens.tolist()
        taken: dict[int, list[float]] = {0: [], 1: []}
        steps_s: list[float] = []
        for k in range(steps):
            pos = len(prompt) + k
            for half in (0, 1):
                plan = _plan(last[half], [pos] * n, halves[half], list(range(n)))
                before, start = backend.sampling_seconds, time.perf_counter()
                last[half] = backend.step(plan).tokens.tolist()
                steps_s.append(time.perf_counter() - start)
                taken[half].append(backend.sampling_seconds - before)
    finally:
        backend.close()
    chain = statistics.median(taken[1])
    return SamplingFigures(
        n=n, steps=steps, decode_step_s=statistics.median(steps_s),
        argmax_step_s=statistics.median(taken[0]), chain_step_s=chain, chain_per_row_us=chain / n * 1e6,
    )  # fmt: skip
