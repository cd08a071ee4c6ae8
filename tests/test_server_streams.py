"""The HTTP server's streams, disconnects and refusals, on the fake backend and the embedded
model, driven with httpx directly (the official clients cannot send malformed requests)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from runtime import DoneReason, GenerateRequest, RequestStats, Runtime
from runtime.core.events import Observers
from runtime.core.records import StepReport
from runtime.server import create_app, serving
from tests.helpers import PROMPTS, open_runtime, wait_until
from tests.test_server_clients import http_client, ollama_client

pytestmark = pytest.mark.parametrize("kind", ["fake", "llama_cpp"])
"""The HTTP layer does not depend on the backend; the runtime's own tests cover the others."""

MODEL = "slotserve"
LONG_PROMPT = " ".join(["a long prompt that takes many prefill steps"] * 40)


class StepClock(Observers):
    """Counts steps, and notes the step count when a request is cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.cancelled_at: list[int] = []

    def step(self, report: StepReport) -> None:
        self.steps += 1

    def request_finished(
        self, reason: DoneReason, stats: RequestStats | None, error: BaseException | None
    ) -> None:
        if reason == "cancel":
            self.cancelled_at.append(self.steps)


@asynccontextmanager
async def served(kind: str, **config: Any) -> AsyncIterator[tuple[Runtime, str, StepClock]]:
    config.setdefault("threads", 1)  # on a shared, busy CPU one decode thread is the steadiest
    async with open_runtime(kind, **config) as rt, serving(create_app(rt)) as url:
        clock = StepClock()
        rt.observers.add(clock)
        yield rt, url, clock


async def post_lines(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[bytes]:
    """POST and read the streamed answer line by line, each line as it arrives."""
    lines: list[bytes] = []
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        buffer = b""
        async for piece in response.aiter_raw():
            buffer += piece
            *complete, buffer = buffer.split(b"\n")
            lines.extend(complete)
        assert buffer == b""  # the stream ends at a line end: no partial object
    return lines


async def test_ndjson_and_sse_frame_line_by_line_and_match_the_whole_answer(kind: str) -> None:
    greedy = {"temperature": 0, "num_predict": 10}
    async with (
        served(kind, slots=2, prefix_cache=False) as (_rt, url, _),
        await http_client(url) as client,
    ):
        results = {}
        ollama_cases: list[tuple[str, dict[str, Any]]] = [
            ("/api/generate", {"model": MODEL, "prompt": PROMPTS[0], "options": greedy}),
            (
                "/api/chat",
                {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "options": greedy},
            ),
        ]
        for path, body in ollama_cases:
            lines = await post_lines(client, path, body)
            objects = [json.loads(line) for line in lines]  # each line is one whole JSON object
            whole = (await client.post(path, json=body | {"stream": False})).json()
            results[path] = (objects, whole)
        sse = {}
        openai_cases: list[tuple[str, dict[str, Any]]] = [
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
            ("/v1/completions", {"model": MODEL, "prompt": PROMPTS[1]}),
        ]
        for path, body in openai_cases:
            body |= {"temperature": 0, "max_tokens": 10}
            lines = await post_lines(
                client, path, body | {"stream": True, "stream_options": {"include_usage": True}}
            )
            whole = (await client.post(path, json=body)).json()
            sse[path] = (lines, whole)
    for path, (objects, whole) in results.items():
        key = "response" if path == "/api/generate" else "message"
        text = [o["response"] if key == "response" else o["message"]["content"] for o in objects]
        assert "".join(text) == (whole["response"] if key == "response" else whole["message"]["content"])
        assert [o["done"] for o in objects] == [False] * (len(objects) - 1) + [True]
        last = objects[-1]
        assert last["done_reason"] == whole["done_reason"]
        assert last["eval_count"] == whole["eval_count"]
        assert (last["done_reason"], last["eval_count"]) == ("length", 10) or last["done_reason"] == "stop"
        assert last["prompt_eval_count"] == whole["prompt_eval_count"] > 0
        for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
            assert isinstance(last[field], int), field
            assert last[field] >= 0, field
        assert last["total_duration"] >= last["prompt_eval_duration"] + last["eval_duration"]
    for path, (lines, whole) in sse.items():
        events = [line for line in lines if line]
        assert all(line == b"" for line in lines[1::2])  # each event ends with a blank line
        assert all(e.startswith(b"data: ") for e in events)
        assert events[-1] == b"data: [DONE]"
        chunks = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
        usage = chunks.pop()
        assert usage["choices"] == []
        assert usage["usage"] == whole["usage"]
        assert 1 <= usage["usage"]["completion_tokens"] <= 10
        finish = [c["choices"][0]["finish_reason"] for c in chunks]
        assert finish == [None] * (len(chunks) - 1) + [whole["choices"][0]["finish_reason"]]
        if path == "/v1/completions":
            assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        else:
            content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            assert content == whole["choices"][0]["message"]["content"]


async def test_a_streaming_client_that_leaves_after_three_chunks_frees_the_slot(kind: str) -> None:
    """The server notices the closed connection and cancels at the next step; the request
    queued behind it then runs exactly as it runs alone."""
    follow = GenerateRequest(prompt=PROMPTS[0], temperature=0, max_tokens=8)
    async with (
        served(kind, slots=1, prefix_cache=False, fake={"step_delay_s": 0.005}) as (rt, url, clock),
        await ollama_client(url) as oc,
    ):
        alone = await rt.complete(follow)
        queued: list[str] = []

        async def ask_behind() -> None:
            opts = {"temperature": 0, "num_predict": 8}
            queued.append(
                (await oc.generate(model=MODEL, prompt=follow.prompt, raw=True, options=opts)).response
            )

        body = {
            "model": MODEL,
            "prompt": PROMPTS[2],
            "raw": True,
            "options": {"temperature": 0, "num_predict": 400},
        }
        async with (
            anyio.create_task_group() as tg,
            await http_client(url) as client,
            client.stream("POST", "/api/generate", json=body) as response,
        ):
            lines = response.aiter_lines()
            first = [json.loads(await anext(lines)) for _ in range(3)]
            tg.start_soon(ask_behind)
            await wait_until(lambda: rt.status().queue_depth == 1)
            closed_at = clock.steps
            # leaving the block closes the connection with the answer unfinished
        cancelled_at = clock.cancelled_at
        status = rt.status()
    assert [o["done"] for o in first] == [False, False, False]
    assert len(cancelled_at) == 1
    assert cancelled_at[0] - closed_at <= 2, (closed_at, cancelled_at)
    assert queued == [alone.text]
    assert status.requests_cancelled == 1
    assert status.slots_busy == 0


async def test_a_client_that_leaves_during_a_long_prompt_frees_the_slot(kind: str) -> None:
    """Not streaming, gone during prefill: cancelled within a step of noticing, before any
    token; the request queued behind it then runs exactly as it runs alone."""
    follow = GenerateRequest(prompt=PROMPTS[0], temperature=0, max_tokens=8)
    config = {"slots": 1, "n_batch": 32, "n_ctx_per_slot": 2048, "prefix_cache": False}
    async with (
        served(kind, fake={"step_delay_s": 0.005}, **config) as (rt, url, clock),
        await ollama_client(url) as oc,
    ):
        alone = await rt.complete(follow)
        sampled = rt.statistics().model.tokens_sampled
        queued: list[str] = []
        gone = anyio.CancelScope()

        async def ask_long() -> None:
            body = {"model": MODEL, "prompt": LONG_PROMPT, "raw": True, "stream": False,
                    "options": {"temperature": 0, "num_predict": 200}}  # fmt: skip
            with gone:
                async with await http_client(url) as client:
                    await client.post("/api/generate", json=body)
                raise AssertionError("the long request should have been abandoned")

        async def ask_behind() -> None:
            opts = {"temperature": 0, "num_predict": 8}
            queued.append(
                (await oc.generate(model=MODEL, prompt=follow.prompt, raw=True, options=opts)).response
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask_long)
            await wait_until(lambda: rt.status().slots_busy == 1)
            tg.start_soon(ask_behind)
            await wait_until(lambda: rt.status().queue_depth == 1)
            steps0 = clock.steps
            await wait_until(lambda: clock.steps >= steps0 + 2)  # prefill under way
            in_prefill = rt.statistics().model.tokens_sampled == sampled
            closed_at = clock.steps
            gone.cancel()  # the client goes away: httpx closes the connection
        cancelled_at = clock.cancelled_at
        await wait_until(lambda: rt.backend.seq_cells(0) == 0)
        status = rt.status()
    assert in_prefill
    assert len(cancelled_at) == 1
    assert cancelled_at[0] - closed_at <= 2, (closed_at, cancelled_at)
    assert queued == [alone.text]
    assert status.requests_cancelled == 1
    assert status.slots_busy == 0


USER = [{"role": "user", "content": "x"}]
GEN = {"model": MODEL, "prompt": "x"}
BAD: list[tuple[str, str, bytes | dict[str, Any], int, str]] = [
    ("empty body", "/api/generate", b"", 400, "request body is empty"),
    ("invalid JSON", "/api/generate", b'{"model": "slotserve", "prompt": ', 400, "not valid JSON"),
    ("not an object", "/api/chat", b"[1, 2]", 400, "Expected `object`, got `array`"),
    ("prompt of wrong type", "/api/generate", {"model": MODEL, "prompt": 5}, 400, "at `$.prompt`"),
    ("model missing", "/api/generate", {"prompt": "x"}, 400, "missing required field `model`"),
    ("negative num_predict", "/api/generate", GEN | {"options": {"num_predict": -5}},
     400, "options.num_predict is -5"),
    ("NaN literal", "/api/generate",
     b'{"model": "slotserve", "prompt": "x", "options": {"temperature": NaN}}', 400, "NaN and Infinity are not JSON numbers"),
    ("null byte in the prompt", "/api/generate", GEN | {"prompt": "x\u0000y", "raw": True},
     400, "NUL character at index 1"),
    ("lone surrogate in the prompt", "/api/generate",
     b'{"model": "slotserve", "prompt": "x\\udc00", "raw": true}', 400, "lone UTF-16 surrogate"),
    ("option of wrong type", "/api/generate", GEN | {"options": {"num_ctx": "big"}},
     400, "at `$.options.num_ctx`"),
    ("keep_alive no duration", "/api/chat", {"model": MODEL, "messages": USER, "keep_alive": "soon"},
     400, "keep_alive is 'soon'"),
    ("max tokens over the window (OpenAI)", "/v1/completions", GEN | {"max_tokens": 5000},
     400, "max_tokens is 5,000; slot context is 512 tokens"),
    ("empty messages", "/api/chat", {"model": MODEL, "messages": []}, 400, "messages is empty"),
    ("unknown role", "/api/chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
     400, "Invalid enum value 'wizard'"),
    ("unknown model", "/api/generate", GEN | {"model": "llama3"}, 404, "'llama3' not found"),
    ("a file path as model", "/api/chat", {"model": "/etc/passwd", "messages": USER}, 404, "not found"),
    ("huge prompt", "/api/generate", GEN | {"prompt": "word " * 3000, "raw": True},
     400, "slot context is 512 tokens"),
    ("body over the limit", "/api/generate", GEN | {"prompt": "x" * (1 << 20)}, 413, "max_body_bytes"),
    ("messages of wrong type", "/v1/chat/completions", {"model": MODEL, "messages": "hi"},
     400, "Expected `array`, got `str`"),
    ("temperature of wrong type", "/v1/chat/completions",
     {"model": MODEL, "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("n over one", "/v1/chat/completions", {"model": MODEL, "messages": USER, "n": 2}, 400, "n is 2"),
    ("negative max_tokens", "/v1/completions", GEN | {"max_tokens": -1}, 400, "max_tokens is -1"),
    ("unknown model (OpenAI)", "/v1/completions", GEN | {"model": "gpt-4o"}, 404, "'gpt-4o' not found"),
    ("huge prompt, streamed", "/v1/completions", GEN | {"prompt": "word " * 3000, "stream": True},
     400, "slot context is 512 tokens"),
]  # fmt: skip


async def test_malformed_requests_get_their_4xx_and_the_next_request_succeeds(kind: str) -> None:
    async with (
        served(kind, slots=1, n_ctx_per_slot=512) as (rt, url, _),
        await http_client(url) as client,
    ):
        answers = []
        for name, path, body, _status, _fragment in BAD:
            if isinstance(body, bytes):
                response = await client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                response = await client.post(path, json=body)
            answers.append((name, response.status_code, response.json()))
        good = await client.post("/api/generate", json={"model": MODEL, "prompt": PROMPTS[0], "stream": False,
                                                        "options": {"num_predict": 4}})  # fmt: skip
        good_openai = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}
        )
        status = rt.status()
    for (name, path, _, status_code, fragment), (_, got, body) in zip(BAD, answers, strict=True):
        assert got == status_code, (name, body)
        message = body["error"] if path.startswith("/api/") else body["error"]["message"]
        assert fragment in message, (name, message)
        if path.startswith("/v1/"):
            assert body["error"]["type"] == "invalid_request_error", name
            if "slot context is" in fragment:  # OpenAI's code for a prompt that does not fit
                assert body["error"]["code"] == "context_length_exceeded", name
    assert good.status_code == 200
    assert good.json()["eval_count"] == 4
    assert good_openai.status_code == 200
    assert good_openai.json()["usage"]["completion_tokens"] == 3
    assert status.slots_busy == 0
    # The two huge prompts: 15,000 bytes are refused at admission on the fake (a token per byte),
    # after tokenizing on llama.cpp (whose tokens stand for up to 81 bytes).
    assert status.requests_failed == (0 if kind == "fake" else 2)
