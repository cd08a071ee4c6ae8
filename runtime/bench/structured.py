"""Section 7: what structured output costs, and which engine (runtime.bench.grammar_engines).

One runtime of 4 slots on the workload's model serves, in turn, 4 free greedy requests and 4
greedy requests constrained to a JSON schema (an array of at least ``max_tokens`` integers, so
that no constrained answer ends before its max_tokens), each pass ``rounds`` times; the figures
are the passes' generated tokens per second (all four requests together), and the backend's
own clock of the time its grammar masks took (``GrammarRows.mask_seconds``). Then the engine
comparison runs on the same vocabulary. ``python -m runtime.bench.structured`` runs this alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import anyio
import msgspec

from runtime.bench.embedded import embedded_config
from runtime.bench.workload import Workload
from runtime.core.messages import ChatMessage, ChatRequest
from runtime.runtime import Runtime

__all__ = ["StructuredFigures", "main", "measure_structured", "print_structured"]

SLOTS = 4


class StructuredFigures(msgspec.Struct, frozen=True, kw_only=True):
    slots: int
    max_tokens: int
    free_tokens_per_s: float
    """Median over the rounds: tokens the 4 free requests generated / the pass's seconds."""
    constrained_tokens_per_s: float
    constrained_tokens: int
    """Tokens the constrained requests generated in one pass (all of max_tokens each)."""
    mask_us_per_token: float
    """Backend time computing and applying grammar masks, per constrained token (microseconds)."""
    engines: dict[str, Any]
    """runtime.bench.grammar_engines.measure(): compile and per-token cost of each engine."""


def _requests(max_tokens: int, constrained: bool) -> list[ChatRequest]:
    schema = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 999},
        "minItems": max_tokens,
    }
    asks = ["Tell a long story about a ship.", "Describe a city at night.", "Explain how rain forms.",
            "Write about a mountain village."]  # fmt: skip
    return [
        ChatRequest(
            messages=(
                ChatMessage(role="user", content=ask + (" List numbers as JSON." if constrained else "")),
            ),
            temperature=0,
            max_tokens=max_tokens,
            format=schema if constrained else None,
        )
        for ask in asks
    ]


async def _pass(rt: Runtime, requests: list[ChatRequest]) -> tuple[float, int]:
    """Seconds and tokens of the requests served at once."""
    tokens = [0] * len(requests)

    async def one(i: int) -> None:
        tokens[i] = (await rt.complete(requests[i], admission_timeout_s=600)).stats.completion_tokens

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    return time.perf_counter() - start, sum(tokens)


async def measure_structured(workload: Workload, rounds: int = 1) -> StructuredFigures:
    """Both passes ``rounds`` times (after one warm-up of each), then the engine comparison.

    :raises SlotserveError: if a request fails.
    """
    from runtime.bench.grammar_engines import measure

    max_tokens = workload.max_tokens
    free_rate: list[float] = []
    bound_rate: list[float] = []
    config = msgspec.structs.replace(embedded_config(workload, SLOTS), prefix_cache=True)
    async with Runtime(config) as rt:
        free, bound = _requests(max_tokens, False), _requests(max_tokens, True)
        await _pass(rt, free[:1])
        await _pass(rt, bound[:1])  # the vocabulary's grammar tokenizer is built on first use
        grammar = getattr(rt.backend, "grammar", None)
        masked_s0, masked0 = (grammar.mask_seconds, grammar.masked_rows) if grammar else (0.0, 0)
        bound_tokens = 0
        for _ in range(max(rounds, 1)):
            seconds, n = await _pass(rt, free)
            free_rate.append(n / seconds)
            seconds, bound_tokens = await _pass(rt, bound)
            bound_rate.append(bound_tokens / seconds)
        masked_s = grammar.mask_seconds - masked_s0 if grammar else 0.0
        masked = grammar.masked_rows - masked0 if grammar else 0
    engines = await anyio.to_thread.run_sync(measure)
    return StructuredFigures(
        slots=SLOTS,
        max_tokens=max_tokens,
        free_tokens_per_s=statistics.median(free_rate),
        constrained_tokens_per_s=statistics.median(bound_rate),
        constrained_tokens=bound_tokens,
        mask_us_per_token=masked_s / max(masked, 1) * 1e6,
        engines=engines,
    )


def print_structured(figures: dict[str, Any], out: TextIO) -> None:
    """Section 7's table."""
    out.write(
        f"\nsection 7: structured output ({figures['slots']} requests at once, {figures['max_tokens']} tokens each)\n"
        f"  free greedy        {figures['free_tokens_per_s']:8.1f} tok/s\n"
        f"  JSON-schema bound  {figures['constrained_tokens_per_s']:8.1f} tok/s "
        f"(grammar masks {figures['mask_us_per_token']:.0f} us a token)\n"
        f"  {'engine':<18} {'schema':<12} {'compile ms':>10} {'1 row us/tok':>13} {'8 rows us/tok':>14}\n"
    )
    for engine, by_schema in figures["engines"]["engines"].items():
        for name, rows in by_schema.items():
            out.write(
                f"  {engine:<18} {name:<12} {rows['1']['compile_s'] * 1e3:>10.2f} "
                f"{rows['1']['token_s'] * 1e6:>13.0f} {rows['8']['token_s'] * 1e6:>14.0f}\n"
            )
    for engine, note in figures["engines"]["notes"].items():
        out.write(f"  {engine}: {note}\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.bench.structured [--max-tokens 64] [--rounds 3] [--threads 0] [--out F]``."""
    parser = argparse.ArgumentParser(description="slotserve bench, section 7 alone")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("structured.json"))
    args = parser.parse_args(argv)
    workload = Workload(max_tokens=args.max_tokens, threads=args.threads)
    figures = msgspec.to_builtins(anyio.run(measure_structured, workload, args.rounds))
    print_structured(figures, sys.stdout)
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
