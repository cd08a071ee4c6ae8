"""Prompt reuse in multi-turn chat: 8 chats of 6 turns through 4 slots, interleaved.

Every turn of every chat resends the whole conversation. The 8 chats run at once, each sending
its next turn as soon as it has the answer to the last (so the turns interleave and each chat
competes for the 4 slots with 7 others), with caching off and then on; the figures are the share of turn 2-6 prompt tokens served from cache, the TTFT
p50 of each turn, and how many greedy answers equal the same chat's with caching off.

Run alone: ``python -m runtime.bench.reuse [--backend fake|llama_cpp] [--out reuse.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import anyio

from runtime.core.config import BackendName, RuntimeConfig
from runtime.core.messages import ChatMessage, ChatRequest
from runtime.runtime import Runtime

__all__ = ["chat_turns", "run_reuse"]

TOPICS = ("rivers", "bread", "chess", "bees", "glass", "trains", "tea", "maps")
QUESTIONS = (
    "Tell me one fact about {t}.",
    "Why does that matter?",
    "Give an example.",
    "Say it in other words.",
    "What is a common mistake about {t}?",
    "Sum it up in one line.",
)


HOST_CACHE_BYTES = 512 << 20
"""The host-RAM prompt cache's bound with caching on (memory is not read here, so it is set)."""


def chat_turns(n_chats: int, n_turns: int) -> list[list[str]]:
    """The user messages of each chat, turn by turn."""
    return [[q.format(t=TOPICS[c % len(TOPICS)]) for q in QUESTIONS[:n_turns]] for c in range(n_chats)]


async def _run_chats(rt: Runtime, users: list[list[str]], max_tokens: int) -> list[list[dict[str, Any]]]:
    """Each chat's turns: per turn the answer, prompt tokens, cached tokens and TTFT (s)."""
    n_turns = len(users[0])
    history: list[list[ChatMessage]] = [
        [ChatMessage(role="system", content=f"You are chat {c}, a brief assistant.")]
        for c in range(len(users))
    ]
    out: list[list[dict[str, Any]]] = [[] for _ in users]

    async def chat(c: int) -> None:
        for turn in range(n_turns):
            history[c].append(ChatMessage(role="user", content=users[c][turn]))
            request = ChatRequest(messages=tuple(history[c]), max_tokens=max_tokens, temperature=0)
            start = time.perf_counter()
            ttft: float | None = None
            text = ""
            stats = None
            async with rt.chat(request, admission_timeout_s=600) as stream:
                async for chunk in stream:
                    if ttft is None and chunk.token_ids:
                        ttft = time.perf_counter() - start
                    text += chunk.text
                    if chunk.done:
                        stats = chunk.stats
            assert stats is not None
            history[c].append(ChatMessage(role="assistant", content=text))
            out[c].append({
                "answer": text, "prompt_tokens": stats.prompt_tokens,
                "cached_tokens": stats.prompt_tokens_cached, "ttft_s": ttft or 0.0,
            })  # fmt: skip

    async with anyio.create_task_group() as tg:
        for c in range(len(users)):
            tg.start_soon(chat, c)
    return out


def _figures(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    n_turns = len(runs[0])
    later = [t for chat in runs for t in chat[1:]]
    return {
        "cached_share_turns_2_on": sum(t["cached_tokens"] for t in later)
        / sum(t["prompt_tokens"] for t in later),
        "ttft_p50_s_by_turn": [statistics.median(chat[k]["ttft_s"] for chat in runs) for k in range(n_turns)],
    }


async def run_reuse(
    backend: BackendName = "fake",
    *,
    slots: int = 4,
    chats: int = 8,
    turns: int = 6,
    max_tokens: int = 24,
    **config: Any,
) -> dict[str, Any]:
    """Run the chats with caching off, then on; return the figures (see the module docstring).

    :raises SlotserveError: if a request fails or the model cannot be loaded.
    """
    users = chat_turns(chats, turns)
    result: dict[str, Any] = {"backend": backend, "slots": slots, "chats": chats, "turns": turns}
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for name, cache in (("off", False), ("on", True)):
        cfg = RuntimeConfig(
            backend=backend, slots=slots, max_queue=chats, memory_source="none", prefix_cache=cache,
            host_cache_bytes=HOST_CACHE_BYTES if cache else 0, **config,
        )  # fmt: skip
        kwargs: dict[str, Any] = {}
        if backend == "fake":
            from runtime.backends.fake import FakeBackend

            kwargs["backend"] = FakeBackend(n_seq_max=slots, step_delay_s=0.002)
        async with Runtime(cfg, **kwargs) as rt:
            runs[name] = await _run_chats(rt, users, max_tokens)
            result[f"placement_{name}"] = rt.statistics().supervisor.placement.by_prefix
        result[f"cache_{name}"] = _figures(runs[name])
    pairs = [
        (a["answer"], b["answer"])
        for ca, cb in zip(runs["off"], runs["on"], strict=True)
        for a, b in zip(ca, cb, strict=True)
    ]
    result["answers_equal"] = sum(a == b for a, b in pairs)
    result["answers"] = len(pairs)
    first_diverged = [
        next((k for k, (a, b) in enumerate(zip(ca, cb, strict=True)) if a["answer"] != b["answer"]), None)
        for ca, cb in zip(runs["off"], runs["on"], strict=True)
    ]
    result["first_diverging_turn_by_chat"] = first_diverged
    return result


def main(argv: list[str] | None = None) -> None:
    """The command line: print the figures and write them as JSON."""
    p = argparse.ArgumentParser(prog="python -m runtime.bench.reuse", description=__doc__)
    p.add_argument("--backend", default="fake", choices=["fake", "llama_cpp"])
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--out", default="reuse.json")
    args = p.parse_args(argv)
    result = anyio.run(lambda: run_reuse(args.backend, max_tokens=args.max_tokens))
    for name in ("off", "on"):
        f = result[f"cache_{name}"]
        ttft = ", ".join(f"{x * 1000:.0f}" for x in f["ttft_p50_s_by_turn"])
        sys.stdout.write(
            f"prefix_cache {name}: {f['cached_share_turns_2_on']:.2f} of turn 2-{result['turns']} prompt tokens "
            f"from cache; TTFT p50 by turn (ms): {ttft}\n"
        )
    sys.stdout.write(f"greedy answers equal to caching off: {result['answers_equal']}/{result['answers']}\n")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
