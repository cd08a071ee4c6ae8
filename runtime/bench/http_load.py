"""Concurrent streaming clients of an OpenAI-compatible ``/v1/completions`` endpoint.

Each client sends its requests one after another; all clients run at once. Times are taken
where a client sees the server-sent events: TTFT at the first event that carries text, ITL
between two such events.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from runtime.bench.workload import PassFigures

__all__ = ["StreamedAnswer", "completion_body", "run_clients", "stream_completion"]


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A greedy streamed completion request (repeat penalty off: llama-cpp-python's server
    applies 1.1 unless told otherwise; usage asked for where the server can send it)."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class StreamedAnswer:
    """One streamed answer as a client saw it (seconds, tokens)."""

    ttft_s: float | None = None
    event_times: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage_tokens: int | None = None

    def tokens(self, max_tokens: int) -> int:
        """Tokens generated: the server's usage count if it sent one, else ``max_tokens`` if it
        stopped for length, else one per event with text (one token each on both servers)."""
        if self.usage_tokens is not None:
            return self.usage_tokens
        if self.finish_reason == "length":
            return max_tokens
        return len(self.event_times)


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> StreamedAnswer:
    """POST ``body`` to ``url`` and read its server-sent events to ``[DONE]``.

    :raises httpx.HTTPStatusError: if the server answers with an error status.
    """
    answer = StreamedAnswer()
    start = time.perf_counter()
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                answer.usage_tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    now = time.perf_counter()
                    if answer.ttft_s is None:
                        answer.ttft_s = now - start
                    answer.event_times.append(now)
                    answer.text += choice["text"]
                if choice.get("finish_reason"):
                    answer.finish_reason = choice["finish_reason"]
    return answer


async def run_clients(base_url: str, model: str, prompts: list[list[str]], max_tokens: int) -> PassFigures:
    """Run one client per entry of ``prompts``, each sending its prompts in turn.

    :returns: the pass's figures; ``n`` is the number of clients.
    :raises httpx.HTTPError: if a request fails.
    """
    answers: list[StreamedAnswer] = []
    limits = httpx.Limits(max_connections=len(prompts) + 2)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def one_client(own: list[str]) -> None:
            for prompt in own:
                body = completion_body(model, prompt, max_tokens)
                answers.append(await stream_completion(client, f"{base_url}/v1/completions", body))

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for own in prompts:
                tg.start_soon(one_client, own)
        wall = time.perf_counter() - start
    ttft = [a.ttft_s for a in answers if a.ttft_s is not None]
    itl = [b - a for x in answers for a, b in zip(x.event_times, x.event_times[1:], strict=False)]
    tokens = sum(a.tokens(max_tokens) for a in answers)
    return PassFigures.of(len(prompts), tokens, wall, ttft, itl)
