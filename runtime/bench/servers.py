"""Section 3, the servers users run: llama.cpp's own C++ server and llama-cpp-python's OpenAI
server, against ``slotserve serve``.

The servers run at once, as subprocesses on free loopback ports, with the same model file, GPU
layers and threads. The same concurrent clients stream greedy completions from each in turns,
the order reversed every round (A B C D, D C B A, ...), so that llama-server and slotserve are
always side by side. llama-server (runtime.bench.llama_server) has as many slots as slotserve,
each its own part of the KV cache of the same size, and batches continuously as slotserve does;
it is the peer users pick, and it is left out with ``--llama-server none``.

llama-cpp-python's server evaluates one request at a time. It runs twice: with slotserve's
threads (like for like), and with its own default threads (``n_threads`` = half the cores,
``n_threads_batch`` = all), as users start it. Both are started with ``--interrupt_requests
False`` (its default, True, cuts a streaming answer short when another request arrives).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from statistics import median
from typing import Any

import anyio
import anyio.abc
import httpx
import msgspec

from runtime.backends.model_files import resolve_model
from runtime.bench.http_load import run_clients
from runtime.bench.llama_server import library_env, llama_server_command
from runtime.bench.workload import PassFigures, Workload, median_pass, prompts

__all__ = ["SERVERS", "ServersFigures", "measure_servers", "round_order"]

log = logging.getLogger("slotserve.bench")
MODEL_NAME = "bench"
START_TIMEOUT_S = 180.0


SERVERS = ("llama_server", "slotserve_server", "llama_cpp_server", "llama_cpp_server_defaults")
"""The servers in the first round's order; each later round reverses the one before."""


def round_order(names: Sequence[str], r: int) -> list[str]:
    """The turns of round ``r`` (from 0) among ``names`` (in :data:`SERVERS`' order): that
    order in even rounds, reversed in odd ones."""
    order = [name for name in SERVERS if name in names]
    return order[::-1] if r % 2 else order


class ServersFigures(msgspec.Struct, frozen=True, kw_only=True):
    """The servers under the same clients: median rounds, and slotserve's throughput ratios."""

    clients: int
    """Concurrent clients, and slots of slotserve and of llama-server."""
    requests_per_client: int
    threads: int
    """CPU threads of slotserve, llama-server and the like-for-like llama-cpp-python server."""
    n_ctx_per_slot: int
    rounds: int
    llama_server: PassFigures | None
    """llama.cpp's C++ server; None when it was left out."""
    llama_server_binary: str | None
    ratio_llama_server: float | None
    """slotserve's aggregate tok/s over llama-server's, the median of the rounds."""
    round_ratios_llama_server: list[float]
    ttft_p50_ratio_llama_server: float | None
    """slotserve's TTFT p50 over llama-server's, the median of the rounds (below 1: sooner)."""
    llama_cpp_server: PassFigures
    llama_cpp_server_defaults: PassFigures
    """llama-cpp-python's server at its own default threads."""
    slotserve_server: PassFigures
    ratio: float
    """slotserve's aggregate tok/s over llama-cpp-python's server's (same threads), the median
    of the rounds."""
    round_ratios: list[float]
    ratio_defaults: float
    """The same against the server at its default threads."""
    round_ratios_defaults: list[float]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_cpp_server_command(workload: Workload, port: int, *, own_threads: bool = False) -> list[str]:
    """``python -m llama_cpp.server`` for the workload's model, on ``port`` of 127.0.0.1; with
    ``own_threads``, at its default thread counts, else at the workload's."""
    t = str(workload.n_threads)
    threads = [] if own_threads else ["--n_threads", t, "--n_threads_batch", t]
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", str(resolve_model(workload.model)),
        "--model_alias", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(workload.n_ctx_per_slot), "--n_batch", str(workload.n_batch), *threads,
        "--n_gpu_layers", str(workload.gpu_layers), "--interrupt_requests", "False",
    ]  # fmt: skip


def slotserve_command(workload: Workload, port: int, slots: int) -> list[str]:
    """``slotserve serve`` for the workload's model with ``slots`` slots, on ``port``."""
    return [
        sys.executable, "-m", "runtime.cli", "serve", "--model", workload.model, "--slots", str(slots),
        "--n-ctx-per-slot", str(workload.n_ctx_per_slot), "--threads", str(workload.n_threads),
        "--host", "127.0.0.1", "--port", str(port), "--model-name", MODEL_NAME,
    ]  # fmt: skip


@asynccontextmanager
async def running(
    command: list[str], port: int, ready_path: str, log_path: Path | None, env: dict[str, str], name: str = ""
) -> AsyncIterator[str]:
    """Start ``command`` (``name`` in messages; its program by default), wait until
    ``ready_path`` answers 200, yield the base URL, then stop it (SIGTERM, then SIGKILL after 10 s).

    :raises RuntimeError: if the server exits or does not answer within 180 s.
    """
    async with AsyncExitStack() as stack:
        out: Any = subprocess.DEVNULL
        if log_path is not None:
            out = stack.enter_context(await anyio.to_thread.run_sync(open, log_path, "wb"))
        proc = await anyio.open_process(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        base = f"http://127.0.0.1:{port}"
        try:
            await _wait_ready(proc, base + ready_path, f"{name or command[0]} (log: {log_path})")
            yield base
        finally:
            proc.terminate()
            with anyio.move_on_after(10, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                with anyio.CancelScope(shield=True):
                    await proc.wait()


async def _wait_ready(proc: anyio.abc.Process, url: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {START_TIMEOUT_S:.0f} s")
            await anyio.sleep(0.2)


async def measure_servers(
    workload: Workload,
    clients: int = 4,
    requests_per_client: int = 2,
    log_dir: Path | None = None,
    llama_server: Path | None = None,
) -> ServersFigures:
    """Serve the workload's model with every server and load each with ``clients`` clients
    sending ``requests_per_client`` requests each, ``workload.repeats`` rounds; llama-server
    runs only where ``llama_server`` gives its binary (runtime.bench.llama_server finds it).

    :raises RuntimeError: if a server does not start.
    """
    names = [n for n in SERVERS if n != "llama_server" or llama_server is not None]
    ports = {name: _free_port() for name in names}
    commands = {
        "llama_cpp_server": llama_cpp_server_command(workload, ports["llama_cpp_server"]),
        "llama_cpp_server_defaults": llama_cpp_server_command(
            workload, ports["llama_cpp_server_defaults"], own_threads=True
        ),
        "slotserve_server": slotserve_command(workload, ports["slotserve_server"], clients),
    }
    envs = {
        "slotserve_server": {
            "SLOTSERVE_MEMORY_SOURCE": "none",
            "SLOTSERVE_N_GPU_LAYERS": str(workload.gpu_layers),
        }
    }
    if llama_server is not None:
        commands["llama_server"] = llama_server_command(
            llama_server, workload, ports["llama_server"], clients, MODEL_NAME
        )
        envs["llama_server"] = library_env(llama_server)
    ready = {name: "/v1/models" if name.startswith("llama_cpp") else "/health" for name in names}
    passes: dict[str, list[PassFigures]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names if name != "slotserve_server"}
    ttft_ratios: list[float] = []
    async with AsyncExitStack() as stack:
        urls = {}
        for name in names:
            log_path = log_dir / f"{name}.log" if log_dir else None
            urls[name] = await stack.enter_async_context(
                running(commands[name], ports[name], ready[name], log_path, envs.get(name, {}), name)
            )
        for url in urls.values():  # warm up
            await run_clients(url, MODEL_NAME, [prompts(1, tag="Warm up. ")], 4)
        for r in range(workload.repeats):
            got: dict[str, PassFigures] = {}
            for name in round_order(names, r):
                texts = prompts(clients * requests_per_client, tag=f"Round {r}. ")
                work = [texts[c::clients] for c in range(clients)]
                got[name] = await run_clients(urls[name], MODEL_NAME, work, workload.max_tokens)
                passes[name].append(got[name])
            ours = got["slotserve_server"]
            for name, found in ratios.items():
                found.append(ours.tokens_per_s / got[name].tokens_per_s)
            if "llama_server" in got:
                ttft_ratios.append(ours.ttft_p50_s / got["llama_server"].ttft_p50_s)
            log.info("servers round %d: %s", r, {k: round(v.tokens_per_s, 1) for k, v in got.items()})
    peer = "llama_server" in names
    return ServersFigures(
        clients=clients,
        requests_per_client=requests_per_client,
        threads=workload.n_threads,
        n_ctx_per_slot=workload.n_ctx_per_slot,
        rounds=workload.repeats,
        llama_server=median_pass(passes["llama_server"]) if peer else None,
        llama_server_binary=str(llama_server) if llama_server is not None else None,
        ratio_llama_server=median(ratios["llama_server"]) if peer else None,
        round_ratios_llama_server=ratios.get("llama_server", []),
        ttft_p50_ratio_llama_server=median(ttft_ratios) if peer else None,
        llama_cpp_server=median_pass(passes["llama_cpp_server"]),
        llama_cpp_server_defaults=median_pass(passes["llama_cpp_server_defaults"]),
        slotserve_server=median_pass(passes["slotserve_server"]),
        ratio=median(ratios["llama_cpp_server"]),
        round_ratios=ratios["llama_cpp_server"],
        ratio_defaults=median(ratios["llama_cpp_server_defaults"]),
        round_ratios_defaults=ratios["llama_cpp_server_defaults"],
    )
