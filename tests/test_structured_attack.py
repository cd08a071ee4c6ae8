"""Attacks on structured output and tools (fake backend): each test here failed before its fix.

- a tool whose parameters are not an object schema was accepted, and its "call" (arguments a
  string or an array) stayed in the text: tool_choice required answered no call;
- an unknown tool_choice (Python API) was taken as required;
- a schema nested past llguidance's limit raised RecursionError, or a message naming no limit;
- a grammar that is not a str raised AttributeError;
- a finished constrained request left its matcher behind (every later step looked it up);
- a large schema compiled against the vocabulary inside a step (every row waited seconds);
- a schema too complex for llguidance's parser passed validation and failed the request in its
  first step, a 500 whose message held the whole grammar (tens of KiB);
- validating a large schema ran on the server's event loop (blocked it for most of a second);
- /v1/completions dropped response_format silently; a history call of a type other than
  function was taken as a function call; Ollama's tool_choice (slotserve's extension) asking
  for a call without tools was dropped;
- with tool_choice auto, blanks then ``<tool_call>`` was free text to the grammar, so the call
  in it went unchecked, and a call after some text was a call whole but text streamed: neither
  constrained (a function not among the tools came back as a call).
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any

import anyio
import pytest

from runtime import ChatMessage, ChatRequest, GenerateRequest, InvalidRequestError
from runtime.backends.fake import FakeBackend
from runtime.backends.grammar import GrammarRows
from runtime.core.messages import Chunk, CompletionBuilder, RequestStats
from runtime.core.structured import MAX_SCHEMA_DEPTH, constraint_grammar
from runtime.core.tools import Tool
from runtime.server import create_app, serving
from runtime.server.tool_calls import CallHoldback
from tests.helpers import greedy, open_runtime, wait_until
from tests.test_server_clients import http_client

USER = (ChatMessage(role="user", content="hi"),)


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


def many_properties(n: int) -> dict[str, Any]:
    """A schema of ``n`` optional properties, named afresh each call (no cache hit): under
    64 KiB, it takes llguidance most of a second to validate and seconds to compile."""
    tag = secrets.token_hex(3)
    return {"type": "object", "properties": {f"{tag}{i}": {} for i in range(n)}}


@pytest.mark.parametrize("kind", ["string", "array", "integer"])
def test_tool_parameters_must_be_an_object_schema(kind: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"tools\\[0\\] \\(f\\) has parameters of type '{kind}'"):
        ChatRequest(messages=USER, tools=(Tool(name="f", parameters={"type": kind}),), tool_choice="required")


async def test_tool_parameters_without_a_type_are_an_object() -> None:
    """``parameters: {}`` (any JSON) is taken as an object schema: the answer is a real call."""
    async with open_runtime("fake", slots=1) as rt:
        answer = await rt.complete_chat(
            ChatRequest(messages=USER, max_tokens=64, temperature=0,
                        tools=(Tool(name="f", parameters={}),), tool_choice="required")
        )  # fmt: skip
    assert len(answer.tool_calls) == 1 and answer.tool_calls[0].function.name == "f"
    assert isinstance(answer.tool_calls[0].function.arguments, dict) and answer.text == ""


@pytest.mark.parametrize("choice", ["bogus", {"name": "f"}])
def test_unknown_tool_choice_is_refused(choice: Any) -> None:
    with pytest.raises(InvalidRequestError, match=r"tool_choice is .*; give 'none', 'auto', 'required'"):
        ChatRequest(messages=USER, tools=(Tool(name="f"),), tool_choice=choice)


@pytest.mark.parametrize("levels", [MAX_SCHEMA_DEPTH + 1, 130, 2000])
def test_deep_schema_is_refused_naming_the_limit(levels: int) -> None:
    limit = f"the limit is {MAX_SCHEMA_DEPTH}"
    with pytest.raises(
        InvalidRequestError, match=f"JSON schema nests .* {levels + 1:,} levels deep; {limit}"
    ):
        GenerateRequest(prompt="x", format=nested(levels))
    tool = Tool(name="f", parameters={"type": "object", "properties": {"a": nested(levels)}})
    with pytest.raises(InvalidRequestError, match=f"parameters schema of tool 'f' nests .*; {limit}"):
        ChatRequest(messages=USER, tools=(tool,), tool_choice="required")
    GenerateRequest(prompt="x", format=nested(MAX_SCHEMA_DEPTH - 1))  # within the limit: compiles


def test_grammar_that_is_not_text_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="grammar is int; give a GBNF or Lark grammar"):
        GenerateRequest(prompt="x", grammar=5)  # type: ignore[arg-type]


async def test_a_finished_constrained_request_leaves_no_matcher() -> None:
    """Ended (finished or cancelled), a constrained request's matcher goes with its sampler: the
    steps after it have no constrained row to look up."""
    async with open_runtime("fake", slots=2) as rt:
        rows = rt.backend.grammar  # type: ignore[attr-defined]
        await rt.complete(greedy("a", 32, format="json"))
        async with rt.generate(greedy("b", 400, format={"type": "object", "properties": {
                "k": {"type": "string", "minLength": 300}}, "required": ["k"]})) as stream:  # fmt: skip
            async for chunk in stream:
                if chunk.text:
                    break
        answer = await rt.complete(greedy("c", 8))
        await wait_until(lambda: not rows.matchers, timeout_s=5)
    assert answer.done_reason == "length" and rows.matchers == {}


async def test_a_large_schema_compiles_outside_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile against the vocabulary runs on a worker thread before the request joins the
    steps, not on the thread that steps (where every row would wait for it); a free request
    alongside is served."""
    async with open_runtime("fake", slots=2) as rt:
        rows: GrammarRows = rt.backend.grammar  # type: ignore[attr-defined]
        compiled_on: set[int] = set()
        stepped_on: set[int] = set()
        prototype, set_matcher = rows._prototype, rows.set

        def spy_prototype(grammar: str) -> Any:
            if grammar not in rows._compiled:
                compiled_on.add(threading.get_ident())
            return prototype(grammar)

        def spy_set(seq_id: int, grammar: str | None) -> None:
            stepped_on.add(threading.get_ident())
            set_matcher(seq_id, grammar)

        monkeypatch.setattr(rows, "_prototype", spy_prototype)
        monkeypatch.setattr(rows, "set", spy_set)
        schema = many_properties(200)
        big, free = await _both(rt, greedy("big", 8, format=schema), greedy("free", 8))
    assert big.text.startswith("{") and free.done_reason == "length"
    assert compiled_on and stepped_on and not compiled_on & stepped_on


async def _both(rt: Any, a: GenerateRequest, b: GenerateRequest) -> list[Any]:
    out: list[Any] = [None, None]

    async def one(i: int, r: GenerateRequest) -> None:
        out[i] = await rt.complete(r)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, 0, a)
        tg.start_soon(one, 1, b)
    return out


async def test_a_large_schema_over_http_does_not_block_the_loop() -> None:
    """Validating a large new schema runs off the event loop (the loop watch fails on a callback
    over 0.25 s: 3,000 optional properties take llguidance about 0.5 s); one too complex for
    the engine's parser is a 400 that names its limit in one line (not a 500 after a step with
    the whole grammar in it), and the next request is served."""
    async with (
        open_runtime("fake", slots=2, n_ctx_per_slot=2048) as rt,
        serving(create_app(rt)) as url,
        await http_client(url) as http,
    ):
        body = {"model": "fake", "prompt": "x", "stream": False, "options": {"num_predict": 4}}
        big = await http.post("/api/generate", json=body | {"format": many_properties(3000)})
        after = await http.post(
            "/api/generate", json=body | {"format": "json", "options": {"num_predict": 16}}
        )
        steps = rt.backend.steps  # type: ignore[attr-defined]
    error = big.json()["error"]
    assert big.status_code == 400 and error.startswith("the output constraint is too complex for the engine")
    assert "max is 2000" in error and "\n" not in error and len(error) < 300
    assert after.status_code == 200 and isinstance(json.loads(after.json()["response"]), dict)
    assert steps > 0


async def test_a_schema_with_no_finite_answer_is_refused_before_compute() -> None:
    """A schema whose every answer nests for ever (a required recursive property) is refused
    before any step, instead of failing the request in its first step with a parser dump."""
    endless = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}},
                               "required": ["c"]}}, "$ref": "#/$defs/n"}  # fmt: skip
    async with open_runtime("fake", slots=1) as rt:
        with pytest.raises(
            InvalidRequestError, match=r"too complex for the engine: .*Too many items"
        ) as info:
            await rt.complete(greedy("x", 40, format=endless))
        steps = rt.backend.steps  # type: ignore[attr-defined]
        after = await rt.complete(greedy("y", 4))
    assert steps == 0 and "\n" not in str(info.value) and after.done_reason == "length"


async def test_http_refusals_and_completions_response_format() -> None:
    """A tool with non-object parameters is a 400 in each API's shape, as is a history call that
    is not a function's, and a call asked for without tools (Ollama); /v1/completions honours response_format (vLLM's extension) instead of
    dropping it."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "tools": [tool],
            "tool_choice": "required", "stream": False}  # fmt: skip
    async with (
        open_runtime("fake", slots=2, n_ctx_per_slot=2048) as rt,
        serving(create_app(rt)) as url,
        await http_client(url) as http,
    ):
        ollama = await http.post("/api/chat", json=chat)
        openai = await http.post("/v1/chat/completions", json=chat)
        web = {"id": "c1", "type": "web_search", "function": {"name": "f", "arguments": "{}"}}
        history = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [web]},
        ]
        kind = await http.post("/v1/chat/completions", json={"model": "fake", "messages": history})
        toolless = await http.post("/api/chat", json=chat | {"tools": None})
        completion = await http.post(
            "/v1/completions",
            json={
                "model": "fake",
                "prompt": "x",
                "max_tokens": 32,
                "response_format": {"type": "json_object"},
            },
        )
    want = "tools[0] (f) has parameters of type 'string'"
    assert ollama.status_code == 400 and want in ollama.json()["error"]
    assert openai.status_code == 400 and want in openai.json()["error"]["message"]
    assert openai.json()["error"]["type"] == "invalid_request_error"
    assert kind.status_code == 400 and "messages[1].tool_calls[0] is" in kind.json()["error"]["message"]
    assert (
        toolless.status_code == 400
        and toolless.json()["error"] == "tool_choice is required but tools is empty"
    )
    assert completion.status_code == 200, completion.text
    choice = completion.json()["choices"][0]
    assert isinstance(json.loads(choice["text"]), dict) and choice["finish_reason"] == "stop"


def test_auto_tools_a_call_only_at_the_start_and_always_constrained() -> None:
    """With tool_choice auto the grammar lets no blank come before a call (it would be free
    text, the call in it unchecked), and a call after text stays text whole as it does streamed."""
    backend = FakeBackend(n_seq_max=1)
    grammar = constraint_grammar(None, None, (Tool(name="f"),), "auto")
    for blanks in (" ", "\n "):
        backend.grammar.set(0, grammar)
        matcher = backend.grammar.matchers[0]
        assert all(matcher.consume_token(1 + b) for b in blanks.encode())
        allowed = backend.grammar.allowed([matcher])[0]
        assert allowed[1 + ord("x")] and not allowed[1 + ord("<")]
    text = 'Let me see. <tool_call>{"name": "rm", "arguments": {}}</tool_call>'
    stats = RequestStats(slot=0, prompt_tokens=1, prompt_tokens_cached=0, completion_tokens=1,
                         load_duration_ns=0, queue_duration_ns=0, prefill_duration_ns=0,
                         decode_duration_ns=0, total_duration_ns=0, time_to_first_token_ns=None)  # fmt: skip
    whole = CompletionBuilder(tools=True).add(
        Chunk(text=text, token_ids=(1,), done=True, done_reason="stop", stats=stats)
    )
    hold = CallHoldback(True)
    assert hold.take(0, text) == text and hold.finish(0, "") == ("", ())
    assert whole is not None and whole.text == text and whole.tool_calls == ()


async def test_many_constrained_requests_each_end_once_and_the_runtime_keeps_serving() -> None:
    """24 requests on 3 slots, two in three constrained (six schemas), some cancelled after their
    first text: each stream ends exactly once, no slot or matcher is left, the next is served."""
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "string", "minLength": 20}},
                "required": [f"k{i}"]} for i in range(6)]  # fmt: skip
    ends = [0] * 24
    async with open_runtime("fake", slots=3, max_queue=32, fake={"step_delay_s": 0.001}) as rt:

        async def one(i: int) -> None:
            request = greedy(f"p{i}", 60, format=schemas[i % 6]) if i % 3 else greedy(f"p{i}", 30)
            async with rt.generate(request) as stream:
                async for chunk in stream:
                    ends[i] += chunk.done
                    if i % 5 == 0 and chunk.text:
                        return

        async with anyio.create_task_group() as tg:
            for i in range(24):
                tg.start_soon(one, i)
        await wait_until(lambda: rt.status().slots_busy == 0 and not rt.backend.grammar.matchers, 10)  # type: ignore[attr-defined]
        after = await rt.complete(greedy("after", 16, format="json"))
        status = rt.status()
    assert ends == [0 if i % 5 == 0 else 1 for i in range(24)]
    assert status.requests_failed == 0 and status.requests_in_flight == 0
    assert isinstance(json.loads(after.text), dict)
