"""Section 6, ``gpurate``: can the runtime keep up with a GPU?

A fake model whose step sleeps as long as a GPU's decode takes (time.sleep releases the GIL,
as a CUDA decode does): 2 ms at N = 8, 3.7 ms at N = 32, 7 ms at N = 128 (an H200 step of a
1.1B model). N concurrent requests of ``max_tokens`` tokens each, through the embedded API
and over HTTP, streamed as OpenAI's SSE (/v1/completions) and as Ollama's NDJSON
(/api/generate). The limit is one step per token: N tokens every step, a step taking what the
sleep really takes here (measured first). The HTTP server runs in a child process, with the
clients (raw sockets that count bytes, so that the client's cost stays small) in this one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Sequence

import anyio
import msgspec
import numpy as np
from prometheus_client import CollectorRegistry

from runtime.backends.base import StepPlan, StepResult
from runtime.backends.fake import FakeBackend
from runtime.bench.dispatch import stream_all
from runtime.core.config import RuntimeConfig
from runtime.runtime import Runtime

__all__ = ["CASES", "MODES", "GpuRateRow", "measure_gpu_rate"]

log = logging.getLogger("slotserve.bench")

CASES: tuple[tuple[int, float], ...] = ((8, 0.002), (32, 0.0037), (128, 0.007))
"""(sequences, seconds a step sleeps)."""
MODES = ("embedded", "sse", "ndjson")
_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8).astype(np.int32) + 1
_MODEL = "gpu-rate"


class GpuRateRow(msgspec.Struct, frozen=True, kw_only=True):
    """One pass: ``n`` requests at once through ``mode``, on steps of ``step_s``."""

    n: int
    mode: str
    step_s: float
    step_measured_s: float
    """What ``time.sleep(step_s)`` takes here (median of 50, in a thread)."""
    tokens: int
    wall_s: float
    tokens_per_s: float
    limit_tokens_per_s: float
    """One step per token: ``n / step_measured_s``."""
    ratio: float
    """``tokens_per_s / limit_tokens_per_s``: the share of the GPU a user gets."""


class GpuRateModel(FakeBackend):
    """The fake backend with a GPU's step: it sleeps ``step_delay_s``, then picks each row's
    next letter from its position in two numpy operations (never the end of generation)."""

    def step(self, plan: StepPlan) -> StepResult:
        if plan.n_tokens == 0:
            return StepResult(tokens=np.empty(0, dtype=np.int32))
        time.sleep(self.step_delay_s)
        rows = plan.output_rows
        return StepResult(tokens=_LETTERS[(plan.positions[rows] + plan.seq_ids[rows]) % len(_LETTERS)])


def measure_sleep(seconds: float, samples: int = 50) -> float:
    """The median time ``time.sleep(seconds)`` takes in a thread other than the event loop's."""
    taken: list[float] = []

    def sample() -> None:
        for _ in range(samples):
            start = time.perf_counter()
            time.sleep(seconds)
            taken.append(time.perf_counter() - start)

    thread = threading.Thread(target=sample)
    thread.start()
    thread.join()
    return statistics.median(taken)


def _config(n: int, max_tokens: int) -> RuntimeConfig:
    return RuntimeConfig(
        backend="fake", slots=n, n_ctx_per_slot=max_tokens + 64, max_tokens_cap=max_tokens,
        memory_source="none", prefix_cache=False, max_queue=n,
    )  # fmt: skip


def _runtime(n: int, step_s: float, max_tokens: int, registry: CollectorRegistry | None = None) -> Runtime:
    fake = GpuRateModel(n_seq_max=n, n_ctx_per_slot=max_tokens + 64, step_delay_s=step_s)
    return Runtime(_config(n, max_tokens), backend=fake, registry=registry or CollectorRegistry(), probe=None)


def _request(mode: str, port: int, i: int, max_tokens: int) -> bytes:
    prompt = f"request {i}"
    if mode == "sse":
        path = "/v1/completions"
        body: dict[str, object] = {
            "model": _MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
    else:
        path = "/api/generate"
        body = {"model": _MODEL, "prompt": prompt, "raw": True, "stream": True,
                "options": {"num_predict": max_tokens, "temperature": 0}}  # fmt: skip
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def _dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response (after its head)."""
    body, rest = bytearray(), raw[raw.index(b"\r\n\r\n") + 4 :]
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return bytes(body)


def completion_tokens(mode: str, raw: bytes) -> int:
    """Tokens generated, from the last event of a streamed answer (usage / eval_count).

    :raises ValueError: if the answer did not end with them (an error, a cut stream).
    """
    if not raw.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"the server answered {raw[:200]!r}")
    body = _dechunk(raw).rstrip()
    if mode == "sse":  # the last event is [DONE]; the one before it carries the usage
        last = body[body.rindex(b"data: {") + 6 :].split(b"\n", 1)[0]
        return int(json.loads(last)["usage"]["completion_tokens"])
    return int(json.loads(body[body.rfind(b"\n") + 1 :])["eval_count"])


async def _http_one(mode: str, port: int, i: int, max_tokens: int) -> tuple[bytes, float]:
    """One streamed answer, whole, and when its last byte came (perf_counter)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request(mode, port, i, max_tokens))
        parts = []
        while part := await reader.read(65536):
            parts.append(part)
        return b"".join(parts), time.perf_counter()
    finally:
        writer.close()


async def _http_pass(mode: str, port: int, n: int, max_tokens: int) -> tuple[int, float]:
    """``n`` streams at once: (tokens, seconds until the last one ended). The answers are read
    after the clock stops, so that the client's parsing is not counted."""
    answers: list[tuple[bytes, float]] = [(b"", 0.0)] * n

    async def one(i: int) -> None:
        answers[i] = await _http_one(mode, port, i, max_tokens)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    wall = max(end for _, end in answers) - start
    return sum(completion_tokens(mode, raw) for raw, _ in answers), wall


def _row(n: int, mode: str, step_s: float, measured: float, tokens: int, wall: float) -> GpuRateRow:
    limit = n / measured
    return GpuRateRow(
        n=n, mode=mode, step_s=step_s, step_measured_s=measured, tokens=tokens, wall_s=wall,
        tokens_per_s=tokens / wall, limit_tokens_per_s=limit, ratio=tokens / wall / limit,
    )  # fmt: skip


async def _timed(work: Awaitable[int]) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = await work
    return tokens, time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve_child(n: int, step_s: float, max_tokens: int, port: int) -> anyio.abc.Process:
    command = [
        sys.executable,
        "-m",
        "runtime.bench.gpu_rate",
        str(n),
        str(step_s),
        str(max_tokens),
        str(port),
    ]
    proc = await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gpu-rate server did not start (exit {proc.returncode})") from None
            await anyio.sleep(0.1)
        else:
            writer.close()
            return proc


async def measure_gpu_rate(
    max_tokens: int = 128,
    cases: Sequence[tuple[int, float]] = CASES,
    modes: Sequence[str] = MODES,
    rounds: int = 1,
) -> list[GpuRateRow]:
    """Each case through each mode, ``rounds`` times (a warm-up pass first); one row a pass.

    :raises RuntimeError: if the HTTP server does not start.
    :raises ValueError: if a streamed answer does not end with its token count.
    """
    rows: list[GpuRateRow] = []
    for n, step_s in cases:
        measured = await anyio.to_thread.run_sync(measure_sleep, step_s)
        if "embedded" in modes:
            async with _runtime(n, step_s, max_tokens) as rt:
                await stream_all(rt, n, 4)
                for _ in range(rounds):
                    tokens, wall = await _timed(stream_all(rt, n, max_tokens))
                    rows.append(_row(n, "embedded", step_s, measured, tokens, wall))
        http = [m for m in modes if m != "embedded"]
        if not http:
            continue
        port = _free_port()
        proc = await _serve_child(n, step_s, max_tokens, port)
        try:
            await _http_pass(http[0], port, n, 4)
            for _ in range(rounds):
                for mode in http:
                    tokens, wall = await _http_pass(mode, port, n, max_tokens)
                    rows.append(_row(n, mode, step_s, measured, tokens, wall))
        finally:
            proc.terminate()
            await proc.wait()
        log.info("gpurate N=%d: %s", n, [(r.mode, round(r.ratio, 2)) for r in rows if r.n == n])
    return rows


async def _serve(n: int, step_s: float, max_tokens: int, port: int) -> None:
    """The child: the runtime on GpuRateModel behind slotserve's HTTP server on ``port``."""
    from runtime.server.app import create_app
    from runtime.server.serve import serving
    from runtime.server.settings import ServerSettings

    settings = ServerSettings(model_name=_MODEL)
    async with _runtime(n, step_s, max_tokens) as rt, serving(create_app(rt, settings), port=port):
        await anyio.sleep_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    anyio.run(_serve, int(args[0]), float(args[1]), int(args[2]), int(args[3]))
