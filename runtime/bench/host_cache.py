"""The host-RAM prompt cache: 16 distinct long prompts through 2 slots, then the same 16 again.

Each prompt is sent alone (one after another), so every request finds both slots holding other
prompts; the second pass can reuse a prompt only from the host cache. The run is made with the
cache on (``host_cache_bytes``) and off (0); the figures are each pass's prompt tokens evaluated
(not restored, not from cells), its TTFT p50, the cache's hits and bytes, and how many greedy
answers equal those with the cache off.

Run alone: ``python -m runtime.bench.host_cache [--backend fake|llama_cpp] [--out host_cache.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import anyio

from runtime.core.config import BackendName, RuntimeConfig
from runtime.core.messages import GenerateRequest
from runtime.runtime import Runtime

__all__ = ["long_prompts", "run_host_cache"]


def long_prompts(n: int, repeat: int) -> list[str]:
    """``n`` prompts that share no first token, each about ``repeat`` sentences long."""
    return [f"{chr(65 + i)}: story {i}. " + f"The {i}th traveller walks on. " * repeat for i in range(n)]


async def _passes(rt: Runtime, prompts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    out = []
    for prompt in prompts + prompts:
        done = await rt.complete(GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0))
        s = done.stats
        out.append({
            "answer": done.text, "evaluated": s.prompt_tokens - s.prompt_tokens_cached,
            "ttft_s": (s.time_to_first_token_ns or 0) / 1e9,
        })  # fmt: skip
    return out


async def run_host_cache(
    backend: BackendName = "fake",
    *,
    prompts: int = 16,
    repeat: int = 20,
    max_tokens: int = 8,
    cache_bytes: int = 512 << 20,
    **config: Any,
) -> dict[str, Any]:
    """Both passes with the cache on, then off; the figures (see the module docstring).

    :raises SlotserveError: if a request fails or the model cannot be loaded.
    """
    texts = long_prompts(prompts, repeat)
    result: dict[str, Any] = {"backend": backend, "slots": 2, "prompts": prompts, "cache_bytes": cache_bytes}
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, size in (("on", cache_bytes), ("off", 0)):
        cfg = RuntimeConfig(
            backend=backend,
            slots=2,
            memory_source="none",
            host_cache_bytes=size,
            n_ctx_per_slot=1024,
            **config,
        )
        kwargs: dict[str, Any] = {}
        if backend == "fake":
            from runtime.backends.fake import FakeBackend

            kwargs["backend"] = FakeBackend(n_seq_max=2, n_ctx_per_slot=1024, step_delay_s=0.002)
        async with Runtime(cfg, **kwargs) as rt:
            runs[name] = rows = await _passes(rt, texts, max_tokens)
            cache = rt.statistics().model.host_cache
        for k, part in ((1, rows[:prompts]), (2, rows[prompts:])):
            result[f"{name}_pass{k}_evaluated_tokens"] = sum(r["evaluated"] for r in part)
            result[f"{name}_pass{k}_ttft_p50_s"] = statistics.median(r["ttft_s"] for r in part)
        if cache is not None:
            result["hits"], result["held_bytes"], result["tokens_saved"] = (
                cache.hits,
                cache.held_bytes,
                cache.tokens_saved,
            )
    result["answers_equal"] = sum(
        a["answer"] == b["answer"] for a, b in zip(runs["on"], runs["off"], strict=True)
    )
    result["answers"] = 2 * prompts
    return result


def main(argv: list[str] | None = None) -> None:
    """The command line: print the figures and write them as JSON."""
    p = argparse.ArgumentParser(prog="python -m runtime.bench.host_cache", description=__doc__)
    p.add_argument("--backend", default="fake", choices=["fake", "llama_cpp"])
    p.add_argument("--out", default="host_cache.json")
    args = p.parse_args(argv)
    r = anyio.run(lambda: run_host_cache(args.backend))
    for name in ("on", "off"):
        sys.stdout.write(
            f"host cache {name}: prompt tokens evaluated, pass 1 {r[f'{name}_pass1_evaluated_tokens']}, "
            f"pass 2 {r[f'{name}_pass2_evaluated_tokens']}; TTFT p50 pass 1 {r[f'{name}_pass1_ttft_p50_s'] * 1000:.0f} ms, "
            f"pass 2 {r[f'{name}_pass2_ttft_p50_s'] * 1000:.0f} ms\n"
        )
    sys.stdout.write(
        f"hits {r.get('hits', 0)}, {r.get('held_bytes', 0):,} bytes held; "
        f"greedy answers equal to the cache off: {r['answers_equal']}/{r['answers']}\n"
    )
    with open(args.out, "w") as f:
        json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
