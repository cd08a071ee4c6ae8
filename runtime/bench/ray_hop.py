"""Section 8, the Ray hop: ``slotserve serve --ray`` (Serve's proxy -> Ingress -> one Engine
replica) against ``slotserve serve`` alone, same model, slots, threads and clients; then what
Ray, Serve and two Engine replicas take to start and hold in memory.

Both servers run at once as subprocesses on free loopback ports; the clients stream greedy
completions from each in turns, the order reversed every round. The hop's cost is the TTFT p50
difference (ms) and the throughput ratio, on the workload's model and then on the fake backend
(no compute: what is left is the serving paths' own cost). Start-up is timed from the command's start to /health
listing both replicas ready; memory is the resident set (RSS) of the command's whole process
tree then (Ray's GCS, raylet, dashboard-less agents, Serve's controller and proxy, the Board,
the Ingress and the Engines). Needs the ray extra; nothing here imports Ray.
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import median
from typing import Any, TextIO

import anyio
import httpx
import msgspec
import psutil

from runtime.bench.http_load import run_clients
from runtime.bench.servers import MODEL_NAME, _free_port, running, slotserve_command
from runtime.bench.workload import PassFigures, Workload, median_pass, prompts

__all__ = ["HopPair", "RayHopFigures", "measure_ray_hop", "print_ray_hop"]

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


class RayHopFigures(msgspec.Struct, frozen=True, kw_only=True):
    """The Ray path against the server alone (seconds, bytes)."""

    clients: int
    requests_per_client: int
    threads: int
    rounds: int
    pairs: list[HopPair]
    """The workload's model, then the fake backend (no compute: the paths' own cost)."""
    startup_s: float
    """From ``slotserve serve --ray --replicas 2`` starting to both replicas ready."""
    rss_bytes: int
    """RSS of that command's process tree with both replicas idle."""
    processes: int


def _tree_rss(pid: int) -> tuple[int, int]:
    """(RSS bytes, processes) of ``pid`` and every descendant."""
    root = psutil.Process(pid)
    total, count = 0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
            count += 1
        except psutil.Error:
            pass
    return total, count


def _ray_command(workload: Workload, port: int, slots: int, replicas: int) -> list[str]:
    return [
        *slotserve_command(workload, port, slots),
        "--ray",
        "--replicas",
        str(replicas),
        "--replica-cpus",
        "0.5",
    ]


async def _replicas_ready(url: str, replicas: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                body = (await client.get(f"{url}/health")).json()
                if sum(r["state"] == "ready" for r in body.get("replicas", [])) == replicas:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            await anyio.sleep(0.2)
    raise RuntimeError(f"{replicas} replicas were not ready at {url} within {timeout_s:.0f} s")


async def _startup(workload: Workload, slots: int, log_dir: Path | None) -> tuple[float, int, int]:
    port = _free_port()
    log_path = None if log_dir is None else log_dir / "ray-startup.log"
    start = time.perf_counter()
    command = _ray_command(workload, port, slots, 2)
    async with running(command, port, "/health", log_path, RAY_ENV, "slotserve serve --ray") as url:
        await _replicas_ready(url, 2)
        startup_s = time.perf_counter() - start
        await anyio.sleep(2.0)  # idle: the replicas' first reports are in
        pid = _pid_on(port)
        rss, count = await anyio.to_thread.run_sync(_tree_rss, pid)
    return startup_s, rss, count


def _pid_on(port: int) -> int:
    """The pid of our ``slotserve serve --ray`` child on ``port`` (Ray's processes are its
    descendants)."""
    me = psutil.Process()
    for child in me.children():
        if "--ray" in child.cmdline() and str(port) in child.cmdline():
            pid: int = child.pid
            return pid
    raise RuntimeError(f"no slotserve serve --ray child on port {port}")


class HopPair(msgspec.Struct, frozen=True, kw_only=True):
    """One backend's two paths under the same clients (median rounds)."""

    backend: str
    alone: PassFigures
    """``slotserve serve``."""
    ray: PassFigures
    """``slotserve serve --ray --replicas 1``."""
    ttft_p50_overhead_s: float
    """The Ray path's TTFT p50 less the server's alone, the median of the rounds."""
    tokens_per_s_ratio: float
    """The Ray path's tok/s over the server's alone, the median of the rounds."""


async def _pair(
    workload: Workload, backend: str, clients: int, requests_per_client: int, log_dir: Path | None
) -> HopPair:
    """Both paths on ``backend`` (``fake``: no compute, the serving paths' own cost), in turns."""
    ports = {"alone": _free_port(), "ray": _free_port()}
    extra = ["--backend", "fake"] if backend == "fake" else []
    commands = {
        "alone": [*slotserve_command(workload, ports["alone"], clients), *extra],
        "ray": [*_ray_command(workload, ports["ray"], clients, 1), *extra],
    }
    passes: dict[str, list[PassFigures]] = {"alone": [], "ray": []}
    overheads: list[float] = []
    ratios: list[float] = []
    async with running(commands["alone"], ports["alone"], "/health", _log(log_dir, f"alone-{backend}"), {}, "slotserve serve") as alone, \
            running(commands["ray"], ports["ray"], "/health", _log(log_dir, f"ray-{backend}"), RAY_ENV, "slotserve serve --ray") as ray:  # fmt: skip
        urls = {"alone": alone, "ray": ray}
        await _replicas_ready(ray, 1)
        for url in urls.values():
            await run_clients(url, MODEL_NAME, [prompts(1, tag="Warm up. ")], 4)
        for r in range(max(workload.repeats, 1)):
            got: dict[str, PassFigures] = {}
            for name in ("alone", "ray") if r % 2 == 0 else ("ray", "alone"):
                texts = prompts(clients * requests_per_client, tag=f"Round {r}. ")
                got[name] = await run_clients(urls[name], MODEL_NAME, [texts[c::clients] for c in range(clients)],
                                              workload.max_tokens)  # fmt: skip
                passes[name].append(got[name])
            overheads.append(got["ray"].ttft_p50_s - got["alone"].ttft_p50_s)
            ratios.append(got["ray"].tokens_per_s / got["alone"].tokens_per_s)
    return HopPair(
        backend=backend, alone=median_pass(passes["alone"]), ray=median_pass(passes["ray"]),
        ttft_p50_overhead_s=median(overheads), tokens_per_s_ratio=median(ratios),
    )  # fmt: skip


async def measure_ray_hop(
    workload: Workload, clients: int = 4, requests_per_client: int = 2, log_dir: Path | None = None
) -> RayHopFigures:
    """Load ``slotserve serve`` and ``slotserve serve --ray --replicas 1`` with ``clients``
    clients of ``requests_per_client`` requests, ``workload.repeats`` rounds, on the workload's
    model and on the fake backend; then time and weigh the start of two replicas.

    :raises RuntimeError: if a server does not start.
    """
    startup_s, rss, count = await _startup(workload, clients, log_dir)
    pairs = [await _pair(workload, b, clients, requests_per_client, log_dir) for b in ("llama_cpp", "fake")]
    return RayHopFigures(
        clients=clients, requests_per_client=requests_per_client, threads=workload.n_threads,
        rounds=max(workload.repeats, 1), pairs=pairs, startup_s=startup_s, rss_bytes=rss, processes=count,
    )  # fmt: skip


def _log(log_dir: Path | None, name: str) -> Path | None:
    return None if log_dir is None else log_dir / f"ray-hop-{name}.log"


def print_ray_hop(f: dict[str, Any], out: TextIO) -> None:
    """Section 8's table (TTFT in milliseconds)."""
    out.write(f"\nsection 8: the Ray hop, one replica, {f['clients']} concurrent streaming clients, "
              f"{f['requests_per_client']} requests each, {f['threads']} threads\n")  # fmt: skip
    out.write(
        f"{'backend':<10} {'path':<24} {'tokens':>6} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8}\n"
    )
    for pair in f["pairs"]:
        for key, label in (("alone", "slotserve serve"), ("ray", "slotserve serve --ray")):
            p = pair[key]
            out.write(f"{pair['backend']:<10} {label:<24} {p['completion_tokens']:>6} {p['tokens_per_s']:>8.1f} "
                      f"{p['ttft_p50_s'] * 1e3:>7.1f}ms {p['ttft_p99_s'] * 1e3:>7.1f}ms {p['itl_p50_s'] * 1e3:>6.1f}ms\n")  # fmt: skip
        out.write(f"{pair['backend']:<10} Ray hop: TTFT p50 {pair['ttft_p50_overhead_s'] * 1e3:+.1f} ms, "
                  f"tok/s x{pair['tokens_per_s_ratio']:.2f} (medians of {f['rounds']} rounds)\n")  # fmt: skip
    out.write(f"Ray + Serve + 2 replicas: ready in {f['startup_s']:.1f} s, RSS {f['rss_bytes'] / 2**20:.0f} MiB "
              f"in {f['processes']} processes\n")  # fmt: skip
    out.flush()
