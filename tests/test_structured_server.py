"""Structured output and tools over HTTP on the fake backend (fast, exact): Ollama's ``format``
on /api/generate and /api/chat, OpenAI's ``response_format``, tool calls whole and streamed in
each API's framing, tool history kept, refusals in each API's error shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jsonschema

from runtime.server import create_app, serving
from tests.helpers import open_runtime
from tests.test_server_clients import http_client

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 7}},
    "required": ["n"],
}
TOOL = {
    "type": "function",
    "function": {"name": "add", "description": "Add", "parameters": SCHEMA},
}
jsonschema.validate({"a": [1]}, {"type": "object"})  # builds the validator once, here, not on a test's loop


@asynccontextmanager
async def served() -> AsyncIterator[httpx.AsyncClient]:
    async with (
        open_runtime("fake", slots=2, n_ctx_per_slot=2048) as rt,
        serving(create_app(rt)) as url,
        await http_client(url) as http,
    ):
        yield http


def lines(body: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line]


def events(body: str) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for e in body.split("\n\n") if e.startswith("data: {")]


async def test_ollama_format_and_tools() -> None:
    async with served() as http:
        gen = (await http.post("/api/generate", json={"model": "fake", "prompt": "x", "format": SCHEMA,
                                                      "stream": False})).json()  # fmt: skip
        chat_stream = await http.post("/api/chat", json={"model": "fake", "format": "json",
                                                         "messages": [{"role": "user", "content": "y"}]})  # fmt: skip
        body = {"model": "fake", "messages": [{"role": "user", "content": "add"}], "tools": [TOOL],
                "tool_choice": "required"}  # fmt: skip
        whole = (await http.post("/api/chat", json=body | {"stream": False})).json()
        streamed = lines((await http.post("/api/chat", json=body)).text)
        history = [
            {"role": "user", "content": "add"},
            {"role": "assistant", "content": "", "tool_calls": whole["message"]["tool_calls"]},
            {"role": "tool", "content": "5", "tool_name": "add"},
        ]
        after = await http.post("/api/chat", json={"model": "fake", "messages": history, "tools": [TOOL],
                                                   "stream": False, "options": {"num_predict": 4}})  # fmt: skip
        bad = await http.post("/api/chat", json=body | {"tool_choice": {"function": {"name": "nope"}}})
    jsonschema.validate(json.loads(gen["response"]), SCHEMA)
    text = "".join(p["message"]["content"] for p in lines(chat_stream.text))
    assert isinstance(json.loads(text), dict)
    (call,) = whole["message"]["tool_calls"]
    assert call["function"]["name"] == "add" and whole["message"]["content"] == ""
    jsonschema.validate(call["function"]["arguments"], SCHEMA)
    with_calls = [p for p in streamed if p["message"].get("tool_calls")]
    assert len(with_calls) == 1 and not with_calls[0]["done"] and streamed[-1]["done"]
    assert with_calls[0]["message"]["tool_calls"] == whole["message"]["tool_calls"]
    assert "".join(p["message"]["content"] for p in streamed) == ""
    assert after.status_code == 200
    assert bad.status_code == 400 and "tool_choice names 'nope'; the tools are add" in bad.json()["error"]


async def test_openai_response_format_and_tool_calls() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    async with served() as http:
        fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}
        schema_answer = (await http.post("/v1/chat/completions", json={"model": "fake", "messages": msgs,
                                                                       "response_format": fmt})).json()  # fmt: skip
        obj = (await http.post("/v1/chat/completions", json={"model": "fake", "messages": msgs,
                                                             "response_format": {"type": "json_object"}})).json()  # fmt: skip
        body = {"model": "fake", "messages": msgs, "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "add"}}}  # fmt: skip
        whole = (await http.post("/v1/chat/completions", json=body)).json()
        streamed = events((await http.post("/v1/chat/completions", json=body | {"stream": True})).text)
        call = whole["choices"][0]["message"]["tool_calls"][0]
        history = [*msgs, {"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": call["id"], "content": "5"}]  # fmt: skip
        after = await http.post(
            "/v1/chat/completions", json={"model": "fake", "messages": history, "max_tokens": 4}
        )
        legacy = await http.post("/v1/chat/completions", json={"model": "fake", "messages": msgs,
                                                               "functions": [{"name": "f"}]})  # fmt: skip
    jsonschema.validate(json.loads(schema_answer["choices"][0]["message"]["content"]), SCHEMA)
    assert isinstance(json.loads(obj["choices"][0]["message"]["content"]), dict)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "add"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)
    deltas = [e["choices"][0]["delta"] for e in streamed]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0][0]["index"] == 0 and calls[0][0]["function"] == call["function"]
    assert deltas[0]["role"] == "assistant" and not any(d.get("content") for d in deltas)
    assert streamed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert after.status_code == 200
    err = legacy.json()["error"]
    assert (
        legacy.status_code == 400 and err["type"] == "invalid_request_error" and "functions" in err["message"]
    )
