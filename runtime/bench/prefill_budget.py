"""The prefill budget's trade-off: 3 slots decoding while a 1,500-token prompt arrives.

Three greedy requests decode; once they stream, a long prompt is sent to the fourth slot. The
decoders' inter-token latency while the long prompt is evaluated (its p99 and max) and the
long prompt's TTFT are measured without a budget (``prefill_budget_s`` 0: each step takes up
to ``n_batch`` prompt tokens) and with the given budgets.

Run alone: ``python -m runtime.bench.prefill_budget [--budgets 0,0.05] [--out budget.json]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Any

import anyio
import numpy as np

from runtime.core.config import RuntimeConfig
from runtime.core.messages import GenerateRequest
from runtime.runtime import Runtime

__all__ = ["run_prefill_budget"]


def _long_prompt(rt: Runtime, n_tokens: int) -> str:
    words = " ".join(f"item{i % 97} is filed under shelf {i % 13}." for i in range(n_tokens))
    ids = rt.backend.tokenize(words, add_special=False, parse_special=False)[:n_tokens]
    return bytes(b for t in ids for b in rt.backend.pieces[t]).decode(errors="ignore")


async def _one_run(cfg: RuntimeConfig, long_tokens: int, decode_tokens: int) -> dict[str, Any]:
    async with Runtime(cfg) as rt:
        prompt = _long_prompt(rt, long_tokens)
        stamps: list[list[float]] = [[] for _ in range(3)]
        window: list[float] = []
        long_ttft: list[float] = []
        streaming = anyio.Event()

        async def decoder(i: int) -> None:
            request = GenerateRequest(
                prompt=f"Count slowly from {i}:", max_tokens=decode_tokens, temperature=0
            )
            async with rt.generate(request) as stream:
                async for chunk in stream:
                    if chunk.token_ids:
                        stamps[i].append(time.perf_counter())
                        if all(len(s) >= 3 for s in stamps):
                            streaming.set()

        async def long_one() -> None:
            await streaming.wait()
            start = time.perf_counter()
            window.append(start)
            request = GenerateRequest(prompt=prompt, max_tokens=2, temperature=0)
            async with rt.generate(request) as stream:
                async for chunk in stream:
                    if chunk.token_ids and not long_ttft:
                        long_ttft.append(time.perf_counter() - start)
                        window.append(time.perf_counter())
                    if chunk.done and chunk.stats is not None:
                        window.append(chunk.stats.prompt_tokens)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(decoder, i)
            tg.start_soon(long_one)
        capped = rt.statistics().model.prefill_capped_steps
    t0, t1 = window[0], window[1]
    gaps = [
        b - a for s in stamps for a, b in itertools.pairwise(s) if b > t0 and a < t1
    ]  # the decoders' gaps that overlap the long prompt's evaluation
    return {
        "prefill_budget_s": cfg.prefill_budget_s,
        "long_prompt_tokens": int(window[2]),
        "long_ttft_s": long_ttft[0],
        "decoder_itl_p99_s": float(np.percentile(gaps, 99)) if gaps else 0.0,
        "decoder_itl_max_s": max(gaps, default=0.0),
        "decoder_tokens_meanwhile": len(gaps),
        "capped_steps": capped,
    }


async def run_prefill_budget(
    budgets: tuple[float, ...] = (0.0, 0.05),
    *,
    long_tokens: int = 1500,
    decode_tokens: int = 160,
    **config: Any,
) -> list[dict[str, Any]]:
    """One run per budget (seconds; 0: none) on the embedded model; the figures of each.

    :raises SlotserveError: if the model cannot be loaded or a request fails.
    """
    results = []
    for budget in budgets:
        cfg = RuntimeConfig(
            slots=4, memory_source="none", prefix_cache=False, prefill_budget_s=budget, **config
        )
        results.append(await _one_run(cfg, long_tokens, decode_tokens))
    return results


def main(argv: list[str] | None = None) -> None:
    """The command line: print the figures and write them as JSON."""
    p = argparse.ArgumentParser(prog="python -m runtime.bench.prefill_budget", description=__doc__)
    p.add_argument("--budgets", default="0,0.05", help="comma-separated prefill_budget_s values")
    p.add_argument("--out", default="prefill_budget.json")
    args = p.parse_args(argv)
    budgets = tuple(float(b) for b in args.budgets.split(","))
    results = anyio.run(lambda: run_prefill_budget(budgets))
    for r in results:
        sys.stdout.write(
            f"prefill_budget_s {r['prefill_budget_s']}: decoders' ITL p99 {r['decoder_itl_p99_s'] * 1000:.0f} ms "
            f"(max {r['decoder_itl_max_s'] * 1000:.0f} ms, {r['decoder_tokens_meanwhile']} tokens) while a "
            f"{r['long_prompt_tokens']}-token prompt was evaluated; its TTFT {r['long_ttft_s']:.2f} s; "
            f"{r['capped_steps']} steps capped\n"
        )
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
