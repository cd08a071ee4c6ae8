"""The ctransformers backend next to llama.cpp: aggregate tokens per second at 1 and 4 slots,
and resident memory (PSS) at 4 slots against 1.

Each (backend, slots) run is a fresh process: the embedded SmolLM2 (llama.cpp) or its copy
converted for ctransformers, greedy chat answers to examples/prompts.json, ``slots`` x
``--rounds`` requests at once. Memory is the PSS of the process that holds the instances
(ctransformers: its worker process; llama.cpp: the runtime's own process) after the run.

Run: python examples/bench_ctransformers.py [--max-tokens 48] [--rounds 4] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

from runtime import ChatMessage, ChatRequest, Runtime, RuntimeConfig
from runtime.backends.ctransformers.convert import convert_for_ctransformers
from runtime.backends.model_files import resolve_model
from runtime.main_job import DEFAULT_PROMPTS

RUNS = [("llama_cpp", 1), ("llama_cpp", 4), ("ctransformers", 1), ("ctransformers", 4)]
MiB = 1 << 20


async def measure(
    backend: str, model: str, slots: int, rounds: int, max_tokens: int, threads: int
) -> dict[str, Any]:
    """One run in this process: tokens per second over ``slots`` x ``rounds`` requests, and PSS."""
    prompts = json.loads(DEFAULT_PROMPTS.read_text())
    cfg = RuntimeConfig(
        backend=backend,  # type: ignore[arg-type]
        model=model, slots=slots, n_ctx_per_slot=512, threads=threads, memory_source="none",
    )  # fmt: skip
    requests = [
        ChatRequest(messages=(ChatMessage(role="user", content=prompts[i % len(prompts)]),), max_tokens=max_tokens,
                    temperature=0)
        for i in range(slots * rounds)
    ]  # fmt: skip
    async with Runtime(cfg) as rt:
        await rt.complete(requests[0])  # warm up: first-use costs are not throughput
        tokens: list[int] = []

        async def run(request: ChatRequest) -> None:
            tokens.append((await rt.complete(request)).stats.completion_tokens)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for request in requests:
                tg.start_soon(run, request)
        seconds = time.perf_counter() - start
        stats = getattr(rt.backend, "statistics", None)
        pid = stats().worker_pid if backend == "ctransformers" and stats is not None else None
        memory = psutil.Process(pid).memory_full_info()
        info = rt.backend.info
    return {
        "backend": backend,
        "slots": slots,
        "threads": threads,
        "requests": len(requests),
        "completion_tokens": sum(tokens),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(sum(tokens) / seconds, 2),
        "pss_bytes": int(memory.pss),
        "rss_bytes": int(memory.rss),
        "weights_bytes": info.weights_bytes,
        "weights_copies": info.weights_copies,
        "kv_bytes_per_slot": info.kv_bytes_per_slot,
    }


def main() -> int:
    """Run every (backend, slots) pair in its own process and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=48, dest="max_tokens")
    parser.add_argument("--rounds", type=int, default=4, help="requests per slot")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per eval, both backends")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "MODEL", "SLOTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, model, slots = args.child
        row = anyio.run(measure, backend, model, int(slots), args.rounds, args.max_tokens, args.threads)
        print(json.dumps(row))
        return 0
    with tempfile.TemporaryDirectory(prefix="slotserve-bench-") as folder:
        converted = convert_for_ctransformers(resolve_model("default"), Path(folder) / "smollm2-ct.gguf")
        rows = []
        for backend, slots in RUNS:
            model = str(converted) if backend == "ctransformers" else "default"
            command = [sys.executable, __file__, "--child", backend, model, str(slots)]
            command += [
                "--rounds",
                str(args.rounds),
                "--max-tokens",
                str(args.max_tokens),
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{backend:>13} {slots} slot(s): {r['tokens_per_s']:7.1f} tok/s  PSS {r['pss_bytes'] / MiB:7.1f} MiB"
            )
    by = {(r["backend"], r["slots"]): r for r in rows}
    ct1, ct4 = by["ctransformers", 1], by["ctransformers", 4]
    lc1, lc4 = by["llama_cpp", 1], by["llama_cpp", 4]
    print(
        f"aggregate tok/s, 1 -> 4 slots: ctransformers {ct1['tokens_per_s']:.1f} -> {ct4['tokens_per_s']:.1f}, "
        f"llama.cpp {lc1['tokens_per_s']:.1f} -> {lc4['tokens_per_s']:.1f}; ctransformers worker PSS "
        f"{ct1['pss_bytes'] / MiB:.0f} MiB (1 slot) -> {ct4['pss_bytes'] / MiB:.0f} MiB (4 slots), "
        f"llama.cpp process PSS {lc1['pss_bytes'] / MiB:.0f} -> {lc4['pss_bytes'] / MiB:.0f} MiB "
        f"({args.threads} thread(s) per eval)"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
