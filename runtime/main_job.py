"""``slotserve run``: the main job. Serve a set of prompts concurrently through the slots,
show each slot's progress live, then compare with the same prompts one at a time."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import anyio
import msgspec

from runtime.core.config import RuntimeConfig
from runtime.core.messages import ChatMessage, ChatRequest, Completion, CompletionBuilder
from runtime.runtime import Runtime

__all__ = ["DEFAULT_PROMPTS", "JobReport", "run_job"]

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "examples" / "prompts.json"


class RequestReport(msgspec.Struct, frozen=True, kw_only=True):
    """One request of the job: its sizes (tokens) and speeds (seconds, tokens/s)."""

    prompt: str
    slot: int
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tokens_per_s: float
    done_reason: str


class PassReport(msgspec.Struct, frozen=True, kw_only=True):
    """All requests of one pass, and the pass's aggregate throughput."""

    requests: list[RequestReport]
    wall_s: float
    completion_tokens: int
    aggregate_tokens_per_s: float


class JobReport(msgspec.Struct, frozen=True, kw_only=True):
    """The concurrent pass, the one-at-a-time pass, and their throughput ratio."""

    model: str
    slots: int
    concurrent: PassReport
    sequential: PassReport
    speedup: float


@dataclass
class _Progress:
    """Each request's progress (tokens so far, or done), for the live display."""

    tokens: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)

    def line(self, n: int) -> str:
        cells = []
        for i in range(n):
            mark = "done" if i in self.done else f"{self.tokens.get(i, 0):4d} tok"
            cells.append(f"#{i}: {mark}")
        return " | ".join(cells)


def _report(prompt: str, c: Completion) -> RequestReport:
    s = c.stats
    decode_s = s.decode_duration_ns / 1e9
    return RequestReport(
        prompt=prompt,
        slot=s.slot,
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        ttft_s=(s.time_to_first_token_ns or 0) / 1e9,
        tokens_per_s=(s.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0,
        done_reason=c.done_reason,
    )


def _pass(reports: list[RequestReport], wall_s: float) -> PassReport:
    tokens = sum(r.completion_tokens for r in reports)
    return PassReport(
        requests=reports, wall_s=wall_s, completion_tokens=tokens, aggregate_tokens_per_s=tokens / wall_s
    )


def _request(prompt: str, max_tokens: int) -> ChatRequest:
    return ChatRequest(
        messages=(ChatMessage(role="user", content=prompt),), max_tokens=max_tokens, temperature=0
    )


async def _concurrent(rt: Runtime, prompts: list[str], max_tokens: int, out: TextIO) -> PassReport:
    progress = _Progress()
    results: list[Completion | None] = [None] * len(prompts)
    live = out.isatty()

    async def one(i: int) -> None:
        answer, n = CompletionBuilder(), 0
        async with rt.chat(_request(prompts[i], max_tokens), admission_timeout_s=600) as stream:
            async for chunk in stream:
                n += len(chunk.token_ids)
                progress.tokens[i] = n
                results[i] = answer.add(chunk)
        progress.done.add(i)

    async def show(stop: anyio.Event) -> None:
        while not stop.is_set():
            status = rt.status()
            line = f"slots busy {status.slots_busy}/{status.slots_effective}, queued {status.queue_depth} | "
            line += progress.line(len(prompts))
            out.write(f"\r\x1b[2K{line}" if live else line + "\n")
            out.flush()
            with anyio.move_on_after(0.2 if live else 1.0):
                await stop.wait()
        if live:
            out.write("\n")

    start = time.perf_counter()
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(show, stop)
        async with anyio.create_task_group() as requests:
            for i in range(len(prompts)):
                requests.start_soon(one, i)
        stop.set()
    wall = time.perf_counter() - start
    return _pass([_report(p, r) for p, r in zip(prompts, results, strict=True) if r is not None], wall)


async def _sequential(rt: Runtime, prompts: list[str], max_tokens: int) -> PassReport:
    start = time.perf_counter()
    reports = [_report(p, await rt.complete_chat(_request(p, max_tokens))) for p in prompts]
    return _pass(reports, time.perf_counter() - start)


def _table(title: str, p: PassReport, out: TextIO) -> None:
    out.write(f"\n{title}\n")
    out.write(
        f"{'#':>2} {'slot':>4} {'prompt':>6} {'gen':>5} {'TTFT s':>7} {'tok/s':>7}  {'end':<6} prompt\n"
    )
    for i, r in enumerate(p.requests):
        text = r.prompt if len(r.prompt) <= 44 else r.prompt[:41] + "..."
        out.write(
            f"{i:>2} {r.slot:>4} {r.prompt_tokens:>6} {r.completion_tokens:>5} {r.ttft_s:>7.3f} "
            f"{r.tokens_per_s:>7.1f}  {r.done_reason:<6} {text}\n"
        )
    out.write(
        f"   {p.completion_tokens} tokens in {p.wall_s:.2f} s: {p.aggregate_tokens_per_s:.1f} tok/s aggregate\n"
    )


async def run_job(
    config: RuntimeConfig,
    prompts_path: Path = DEFAULT_PROMPTS,
    max_tokens: int = 64,
    out: TextIO = sys.stdout,
) -> JobReport:
    """Run the prompts in ``prompts_path`` (a JSON list of strings) concurrently, then one at
    a time on the model loaded again (so that neither pass finds the other's prompts kept in
    the slots or the host cache), print both tables and return the report.

    :raises ModelLoadError: if the model cannot be loaded.
    """
    prompts = msgspec.json.decode(await anyio.Path(prompts_path).read_bytes(), type=list[str])
    async with Runtime(config) as rt:
        status = rt.status()
        out.write(
            f"{status.model}: {status.slots_effective} slots x {status.n_ctx_per_slot} tokens, "
            f"weights {status.weights_bytes / 2**20:.1f} MiB, KV {status.kv_bytes_per_slot / 2**20:.1f} MiB "
            f"per slot, loaded in {rt.load_seconds:.2f} s\n"
        )
        out.write(f"{len(prompts)} prompts at once on {status.slots_effective} slots:\n")
        concurrent = await _concurrent(rt, prompts, max_tokens, out)
    out.write(
        "the same prompts one at a time, on the model loaded afresh (no prompt kept from the first pass)...\n"
    )
    async with Runtime(config) as rt:
        sequential = await _sequential(rt, prompts, max_tokens)
    _table(f"Concurrent ({status.slots_effective} slots)", concurrent, out)
    _table("One at a time", sequential, out)
    speedup = concurrent.aggregate_tokens_per_s / sequential.aggregate_tokens_per_s
    out.write(f"\nconcurrent / one at a time: {speedup:.2f}x aggregate tok/s\n")
    return JobReport(
        model=status.model,
        slots=status.slots_effective,
        concurrent=concurrent,
        sequential=sequential,
        speedup=speedup,
    )
