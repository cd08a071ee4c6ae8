"""What every benchmark section runs: the prompts, their lengths, and how the figures are summed up.

The same workload goes to the plain llama.cpp loop, to slotserve's embedded API and to both
HTTP servers, so that their figures compare like for like: raw completion prompts (no chat
template), greedy decoding, the same ``max_tokens``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

__all__ = ["PassFigures", "Workload", "machine", "percentile", "prompts"]

STORY_OPENINGS = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The spaceship drifted silently past the rings of Saturn while the crew",
    "In the heart of the ancient forest, a young girl discovered a hidden door that",
    "The detective looked at the muddy footprints on the kitchen floor and realised that",
    "Every morning the baker opened his shop before sunrise, and on this particular day",
    "High in the mountains, the monks of the old monastery kept a secret that",
    "When the last train left the station, the old clockmaker stayed behind because",
    "The little robot had never seen the ocean, so one day it decided that",
)
"""Story openings: a small model continues them for a long time without stopping (EOS)."""


def prompts(n: int, *, tag: str = "") -> list[str]:
    """``n`` distinct prompts, cycling through the story openings; ``tag`` is put in front
    (a request number, so that no server can reuse another request's prompt cache)."""
    out = []
    for i in range(n):
        text = STORY_OPENINGS[i % len(STORY_OPENINGS)]
        if i >= len(STORY_OPENINGS):
            text = f"Story {i // len(STORY_OPENINGS) + 1}. {text}"
        out.append(f"{tag}{text}")
    return out


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    """The settings every section shares; lengths in tokens."""

    model: str = "default"
    """``default`` (the embedded SmolLM2-135M-Instruct) or a GGUF path."""
    max_tokens: int = 128
    """Tokens each request generates at most (greedy; a sequence may stop earlier at EOS)."""
    n_ctx_per_slot: int = 512
    n_batch: int = 512
    threads: int = 0
    """CPU threads for decoding; 0: every core this process may use."""
    gpu_layers: int = 0
    """Layers on the GPU (-1: all); 0 here, where llama-cpp-python is a CPU build."""
    repeats: int = 3
    """Times each measurement is repeated (interleaved with the one it is compared to)."""

    @property
    def n_threads(self) -> int:
        """The CPU thread count ``threads`` stands for."""
        return self.threads or len(os.sched_getaffinity(0))


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100) of ``samples``; 0.0 when there are none."""
    return float(np.percentile(np.asarray(samples, dtype=float), q)) if len(samples) else 0.0


class PassFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One pass of N concurrent sequences: tokens, time and latencies (seconds).

    ITL is the time between two streamed chunks of one sequence, shared out over the tokens
    the later chunk carries (one token a chunk, mostly).
    """

    n: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    ttft_s: list[float]
    """Every sequence's time to first token, for the distribution plot."""

    @classmethod
    def of(cls, n: int, tokens: int, wall_s: float, ttft_s: list[float], itl_s: list[float]) -> PassFigures:
        """Sum up one pass from its token count, wall time and latency samples (seconds)."""
        return cls(
            n=n,
            completion_tokens=tokens,
            wall_s=wall_s,
            tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
            ttft_p50_s=percentile(ttft_s, 50),
            ttft_p99_s=percentile(ttft_s, 99),
            itl_p50_s=percentile(itl_s, 50),
            itl_p99_s=percentile(itl_s, 99),
            ttft_s=sorted(ttft_s),
        )


def median_pass(passes: Sequence[PassFigures]) -> PassFigures:
    """The pass with the median throughput (of an odd count; the lower middle of an even one)."""
    ranked = sorted(passes, key=lambda p: p.tokens_per_s)
    return ranked[(len(ranked) - 1) // 2]


def machine() -> dict[str, Any]:
    """Where the figures were measured: CPU, cores, load, Python and llama-cpp-python."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average_1m": os.getloadavg()[0],
    }
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
        info["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except ImportError:
        info["llama_cpp_python"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
