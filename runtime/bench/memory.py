"""Memory of the embedded model: the estimate against what the process really holds.

For 1, 2, 4 and 8 slots, each in a fresh process: weights + slots x KV per slot + compute
buffers (the estimate) against the growth of resident memory (RSS) over the interpreter's own;
4 slots in one process against 4 processes of 1 slot each (RSS and PSS, all alive at once);
the pause of live resizes with requests running; and the KV bytes per slot at each cache type.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import anyio
import psutil

from runtime.core.config import RuntimeConfig
from runtime.core.messages import GenerateRequest
from runtime.runtime import Runtime

__all__ = ["measure_memory"]

N_CTX = 1024
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LONG_PROMPT = " ".join(["The lighthouse keeper climbed the stairs and looked at the sea."] * 45)
"""About 600 tokens: one full 512-token ubatch, so the compute buffer is really used."""


def _memory(pid: int | None = None) -> dict[str, int]:
    info = psutil.Process(pid).memory_full_info()
    return {"rss_bytes": int(info.rss), "pss_bytes": int(getattr(info, "pss", info.rss))}


async def _worker(slots: int) -> None:
    """Load, run a full-batch prompt on every slot, report, and stay loaded until stdin closes."""
    import llama_cpp  # noqa: F401  (the library's own memory belongs to the baseline)

    base = _memory()
    cfg = RuntimeConfig(slots=slots, n_ctx_per_slot=N_CTX, memory_source="none")
    async with Runtime(cfg) as rt:
        request = GenerateRequest(prompt=LONG_PROMPT, max_tokens=8, temperature=0)
        async with anyio.create_task_group() as tg:
            for _ in range(slots):
                tg.start_soon(rt.complete, request)
        info = rt.backend.info
        after = _memory()
        estimate = info.weights_bytes + slots * info.kv_bytes_per_slot + info.compute_bytes
        print(json.dumps(_row(slots, info, estimate, base, after)), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # measured from outside meanwhile


def _row(slots: int, info: Any, estimate: int, base: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    return {
        "slots": slots,
        "weights_bytes": info.weights_bytes,
        "kv_bytes_per_slot": info.kv_bytes_per_slot,
        "compute_bytes": info.compute_bytes,
        "estimate_bytes": estimate,
        "measured_bytes": after["rss_bytes"] - base["rss_bytes"],
        "rss_bytes": after["rss_bytes"],
        "pss_bytes": after["pss_bytes"],
    }


async def _resize_pauses() -> list[dict[str, Any]]:
    cfg = RuntimeConfig(slots=4, n_ctx_per_slot=N_CTX, memory_source="none", max_slots=8)
    records = []
    async with Runtime(cfg) as rt:
        request = GenerateRequest(prompt=PROMPT, max_tokens=96, temperature=0)
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(rt.complete, request)
            await anyio.sleep(1.0)
            for n in (8, 4):
                record = await rt.resize(n)
                assert record is not None
                records.append({"from": record.from_slots, "to": record.to_slots, "pause_s": record.pause_s,
                                "drain_s": record.drain_s, "carried_bytes": record.carried_bytes})  # fmt: skip
    return records


def _spawn(slots: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.bench.memory", "--worker", str(slots)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    data: dict[str, Any] = json.loads(proc.stdout.readline())
    data.update(_memory(proc.pid))  # measured from outside, while it is still alive
    return data


def _finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=60)
    proc.stdout.close()  # else a ResourceWarning when the Popen is collected


def measure_memory(slot_counts: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, Any]:
    """Run the memory benchmark; returns the figures (bytes, seconds) and prints a table."""
    rows = []
    for n in slot_counts:
        proc = _spawn(n)
        rows.append(_report(proc))
        _finish(proc)
    together = _spawn(4)
    one = _report(together)
    separate = [_spawn(1) for _ in range(4)]
    apart = [_report(p) for p in separate]
    for p in [together, *separate]:
        _finish(p)
    pauses = anyio.run(_resize_pauses)
    kv_types = {}
    for kv in ("f16", "q8_0", "q4_0"):
        from runtime.backends.llama_cpp import LlamaCppBackend
        from runtime.backends.model_files import resolve_model

        backend = LlamaCppBackend(
            resolve_model("default"), RuntimeConfig(n_ctx_per_slot=N_CTX, kv_cache_type=kv), 1
        )
        kv_types[kv] = {"kv_bytes_per_slot": backend.info.kv_bytes_per_slot,
                        "slots_in_1_gib": (1 << 30) // backend.info.kv_bytes_per_slot}  # fmt: skip
        backend.close()
    result = {
        "n_ctx_per_slot": N_CTX,
        "rows": rows,
        "four_slots_one_process": {"rss_bytes": one["rss_bytes"], "pss_bytes": one["pss_bytes"]},
        "four_processes_one_slot": {
            "rss_bytes": sum(a["rss_bytes"] for a in apart),
            "pss_bytes": sum(a["pss_bytes"] for a in apart),
        },
        "resizes": pauses,
        "kv_cache_types": kv_types,
    }
    _print(result)
    return result


def _print(r: dict[str, Any]) -> None:
    mib = 2**20
    print(
        f"memory, n_ctx_per_slot={r['n_ctx_per_slot']}: estimate (weights + slots x KV + compute) vs RSS growth"
    )
    print(
        f"{'slots':>5} {'weights':>9} {'KV/slot':>8} {'compute':>8} {'estimate':>9} {'measured':>9} {'ratio':>6}"
    )
    for row in r["rows"]:
        print(
            f"{row['slots']:>5} {row['weights_bytes'] / mib:>8.1f}M {row['kv_bytes_per_slot'] / mib:>7.1f}M "
            f"{row['compute_bytes'] / mib:>7.1f}M {row['estimate_bytes'] / mib:>8.1f}M "
            f"{row['measured_bytes'] / mib:>8.1f}M {row['measured_bytes'] / row['estimate_bytes']:>6.3f}"
        )
    one, four = r["four_slots_one_process"], r["four_processes_one_slot"]
    for key in ("rss_bytes", "pss_bytes"):
        saving = 1 - one[key] / four[key]
        print(f"4 slots, one process: {one[key] / mib:.1f} MiB {key[:3].upper()}; 4 processes of 1 slot: "
              f"{four[key] / mib:.1f} MiB; sharing saves {saving:.0%}")  # fmt: skip
    for p in r["resizes"]:
        print(f"resize {p['from']} -> {p['to']} with 4 requests running: pause {p['pause_s'] * 1000:.1f} ms, "
              f"drain {p['drain_s'] * 1000:.1f} ms, {p['carried_bytes'] / mib:.2f} MiB carried")  # fmt: skip
    for kv, v in r["kv_cache_types"].items():
        print(
            f"KV {kv:>5}: {v['kv_bytes_per_slot'] / mib:6.2f} MiB per slot, {v['slots_in_1_gib']} slots in 1 GiB"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        anyio.run(_worker, int(sys.argv[2]))
    else:
        out = measure_memory()
        path = sys.argv[1] if len(sys.argv) > 1 else "bench-memory.json"
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        time.sleep(0)
