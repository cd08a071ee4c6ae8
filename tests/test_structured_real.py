"""Structured output and tool calls on the embedded SmolLM2-135M (a small model: the constraint
does the work), through the Python API and the HTTP server with the official ``ollama`` and
``openai`` clients, streamed and not. Every answer is checked with the jsonschema library."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import jsonschema
import ollama
import openai
import pytest

from runtime import ChatMessage, ChatRequest, Completion, Runtime
from runtime.core.tools import NamedTool, Tool, ToolChoice
from runtime.server import create_app, serving
from tests.helpers import open_runtime
from tests.structured_cases import ADD, SCHEMA_CASES, TOOL_CASES, TOOLS, WEATHER
from tests.test_server_clients import ollama_client, openai_client

MODEL = "slotserve"
MAX_TOKENS = 96
jsonschema.validate({"a": [1]}, {"type": "object"})  # builds the validator once, here, not on a test's loop


@asynccontextmanager
async def served(**config: Any) -> AsyncIterator[tuple[Runtime, str]]:
    """The embedded model with 8 slots and a server for it on a free loopback port."""
    config = {"slots": 8, "threads": 1, "n_ctx_per_slot": 1024, "max_queue": 64} | config
    async with open_runtime("llama_cpp", **config) as rt, serving(create_app(rt)) as url:
        yield rt, url


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"{text} Answer in JSON."}]


def wire_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def wire_choice(choice: ToolChoice) -> Any:
    """OpenAI's tool_choice (also slotserve's extension of Ollama's /api/chat)."""
    return (
        {"type": "function", "function": {"name": choice.name}} if isinstance(choice, NamedTool) else choice
    )


async def ollama_chat(client: ollama.AsyncClient, body: dict[str, Any]) -> Any:
    """POST /api/chat through the ollama client's own request path (its ``chat`` has no
    ``tool_choice``, which Ollama lacks), parsed into its ChatResponse objects."""
    return await client._request(ollama.ChatResponse, "POST", "/api/chat", json=body, stream=body["stream"])


async def gather(jobs: list[Any]) -> list[Any]:
    """Run every zero-argument coroutine function of ``jobs`` at once; their results in order."""
    out: list[Any] = [None] * len(jobs)

    async def run(i: int) -> None:
        out[i] = await jobs[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(run, i)
    return out


async def test_twenty_schemas_validate_through_every_api() -> None:
    """20 schemas, each through the Python API, Ollama's /api/chat and OpenAI's chat completions,
    streamed (even cases) and not (odd): 60/60 answers parse and validate."""
    async with served() as (rt, url), await ollama_client(url) as ol, await openai_client(url) as oa:

        async def python(i: int) -> str:
            text, schema = SCHEMA_CASES[i]
            req = ChatRequest(messages=(ChatMessage(role="user", content=f"{text} Answer in JSON."),),
                              format=schema, temperature=0, max_tokens=MAX_TOKENS)  # fmt: skip
            if i % 2:
                return (await rt.complete(req)).text
            async with rt.generate(req) as stream:
                return "".join([c.text async for c in stream])

        async def via_ollama(i: int) -> str:
            text, schema = SCHEMA_CASES[i]
            opts = {"temperature": 0, "num_predict": MAX_TOKENS}
            if i % 2:
                r = await ol.chat(model=MODEL, messages=ask(text), format=schema, options=opts)
                return r.message.content or ""
            parts = await ol.chat(model=MODEL, messages=ask(text), format=schema, options=opts, stream=True)
            return "".join([p.message.content or "" async for p in parts])

        async def via_openai(i: int) -> str:
            text, schema = SCHEMA_CASES[i]
            fmt: Any = {
                "type": "json_schema",
                "json_schema": {"name": f"case{i}", "schema": schema, "strict": True},
            }
            kw: Any = {"model": MODEL, "messages": ask(text), "response_format": fmt, "temperature": 0,
                       "max_tokens": MAX_TOKENS}  # fmt: skip
            if i % 2:
                r = await oa.chat.completions.create(**kw)
                return r.choices[0].message.content or ""
            chunks = await oa.chat.completions.create(**kw, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

        n = len(SCHEMA_CASES)
        jobs = [lambda i=i, f=f: f(i) for f in (python, via_ollama, via_openai) for i in range(n)]
        texts = await gather(jobs)
    assert n == 20
    for k, text in enumerate(texts):
        schema = SCHEMA_CASES[k % n][1]
        jsonschema.validate(json.loads(text), schema)


def _check_call(name: str, arguments: dict[str, Any], choice: ToolChoice) -> None:
    tool = {t.name: t for t in TOOLS}[name]
    if isinstance(choice, NamedTool):
        assert name == choice.name
    jsonschema.validate(arguments, tool.parameters)


async def test_twenty_tool_calls_through_both_clients() -> None:
    """tool_choice required (10) and named (10): even cases through the ollama client (with
    slotserve's tool_choice extension), odd ones through the openai client, half of each
    streamed; 20/20 are valid calls as each client's own tool-call objects, with finish_reason
    tool_calls on OpenAI."""
    async with served() as (_, url), await ollama_client(url) as ol, await openai_client(url) as oa:
        tools = wire_tools(TOOLS)

        async def via_ollama(i: int) -> tuple[str, dict[str, Any]]:
            text, choice = TOOL_CASES[i]
            body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "tools": tools,
                    "tool_choice": wire_choice(choice), "options": {"temperature": 0, "num_predict": MAX_TOKENS}}  # fmt: skip
            if i % 4 == 0:
                parts = await ollama_chat(ol, body | {"stream": True})
                calls = [c async for p in parts for c in (p.message.tool_calls or [])]
            else:
                calls = list((await ollama_chat(ol, body | {"stream": False})).message.tool_calls or [])
            assert len(calls) == 1, calls
            assert isinstance(calls[0], ollama.Message.ToolCall)
            return calls[0].function.name, dict(calls[0].function.arguments)

        async def via_openai(i: int) -> tuple[str, dict[str, Any]]:
            text, choice = TOOL_CASES[i]
            kw: Any = {"model": MODEL, "messages": [{"role": "user", "content": text}], "tools": tools,
                       "tool_choice": wire_choice(choice), "temperature": 0, "max_tokens": MAX_TOKENS}  # fmt: skip
            if i % 4 == 1:
                chunks = [c async for c in await oa.chat.completions.create(**kw, stream=True)]
                deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
                assert chunks[-1].choices[0].finish_reason == "tool_calls"
                assert len(deltas) == 1 and deltas[0].id and deltas[0].function
                fn = deltas[0].function
                assert fn.name is not None and fn.arguments is not None
                return fn.name, json.loads(fn.arguments)
            r = await oa.chat.completions.create(**kw)
            choice0 = r.choices[0]
            assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
            calls = choice0.message.tool_calls or []
            assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
            return calls[0].function.name, json.loads(calls[0].function.arguments)

        jobs = [lambda i=i: (via_openai if i % 2 else via_ollama)(i) for i in range(len(TOOL_CASES))]
        results = await gather(jobs)
    assert len(results) == 20
    for (name, arguments), (_, choice) in zip(results, TOOL_CASES, strict=True):
        _check_call(name, arguments, choice)


async def test_multi_turn_tool_exchange_through_both_clients() -> None:
    """A call, the tool's result, then the answer in text: through both clients, the history's
    call and tool message reach the prompt (the answer depends on it) and the answer is text."""
    async with served(slots=2) as (_, url), await ollama_client(url) as ol, await openai_client(url) as oa:
        question = {"role": "user", "content": "What is the weather in Paris?"}
        tools = wire_tools((WEATHER, ADD))
        opts = {"temperature": 0, "num_predict": 40}
        first = await ollama_chat(ol, {"model": MODEL, "messages": [question], "tools": wire_tools((WEATHER,)),
                                       "tool_choice": "required", "options": opts, "stream": False})  # fmt: skip
        call = (first.message.tool_calls or [])[0]
        history = [question, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                   {"role": "tool", "content": "18 degrees and sunny", "tool_name": call.function.name}]  # fmt: skip
        ol_answer = await ol.chat(model=MODEL, messages=history, tools=tools, options=opts)
        named: Any = {"model": MODEL, "messages": [question], "tools": tools, "temperature": 0, "max_tokens": 40,
                      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip
        r = await oa.chat.completions.create(**named)
        oa_call = (r.choices[0].message.tool_calls or [])[0]
        oa_history: Any = [
            question,
            {"role": "assistant", "content": None, "tool_calls": [oa_call.model_dump()]},
            {"role": "tool", "tool_call_id": oa_call.id, "content": "18 degrees and sunny"},
        ]
        after: Any = {"model": MODEL, "messages": oa_history, "tools": tools, "tool_choice": "none",
                      "temperature": 0, "max_tokens": 40}  # fmt: skip
        oa_answer = await oa.chat.completions.create(**after)
    assert call.function.name == "get_weather" and oa_call.function.name == "get_weather"
    assert ol_answer.message.content and not ol_answer.message.tool_calls
    text = oa_answer.choices[0].message.content
    assert text and oa_answer.choices[0].finish_reason in ("stop", "length")
    assert "<tool_call>" not in text


async def test_free_greedy_rows_equal_solo_beside_constrained_ones() -> None:
    """Unconstrained greedy requests in one batch with constrained ones give, token for token,
    what they give alone; the constrained answers validate."""
    free = [ChatRequest(messages=(ChatMessage(role="user", content=t),), temperature=0, max_tokens=24)
            for t in ("Name a fruit.", "Count to five.")]  # fmt: skip
    bound = [
        ChatRequest(messages=(ChatMessage(role="user", content=f"{t} Answer in JSON."),), format=s,
                    temperature=0, max_tokens=MAX_TOKENS)
        for t, s in SCHEMA_CASES[:2]
    ]  # fmt: skip
    async with open_runtime("llama_cpp", slots=4, threads=1, prefix_cache=False) as rt:
        solo: list[Completion] = [await rt.complete(r) for r in free]
        mixed: list[Completion] = await gather(
            [lambda r=r: rt.complete(r) for r in (free[0], *bound, free[1])]
        )
    assert [mixed[0].token_ids, mixed[3].token_ids] == [s.token_ids for s in solo]
    for answer, (_, schema) in zip(mixed[1:3], SCHEMA_CASES[:2], strict=True):
        jsonschema.validate(json.loads(answer.text), schema)


async def test_bad_schema_is_a_400_naming_it_and_the_next_request_is_served() -> None:
    bad = {"type": "object", "properties": {"x": {"type": "integr"}}}
    async with served(slots=1) as (rt, url), await ollama_client(url) as ol, await openai_client(url) as oa:
        with pytest.raises(ollama.ResponseError) as ol_err:
            await ol.chat(model=MODEL, messages=ask("x"), format=bad)
        fmt: Any = {"type": "json_schema", "json_schema": {"name": "b", "schema": bad}}
        with pytest.raises(openai.BadRequestError) as oa_err:
            await oa.chat.completions.create(model=MODEL, messages=ask("x"), response_format=fmt)  # type: ignore[arg-type]
        with pytest.raises(ollama.ResponseError, match=r"tools\[0\]\.function\.name"):
            await ol.chat(
                model=MODEL, messages=ask("x"), tools=[{"type": "function", "function": {"name": ""}}]
            )
        steps = rt.statistics().model.steps
        after = await ol.chat(model=MODEL, messages=ask("Pick a colour."), format=SCHEMA_CASES[2][1],
                              options={"temperature": 0, "num_predict": 32})  # fmt: skip
    assert (
        ol_err.value.status_code == 400
        and "does not compile" in str(ol_err.value)
        and "integr" in str(ol_err.value)
    )
    assert oa_err.value.status_code == 400 and "does not compile" in str(oa_err.value)
    assert steps == 0
    jsonschema.validate(json.loads(after.message.content or ""), SCHEMA_CASES[2][1])
