"""Structured output and tools on the fake backend: the constraint is honoured exactly and
deterministically, a bad schema is refused before any compute, constrained and free rows share
a batch without changing the free ones, and the pure parts (call parsing, the stream holdback)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from runtime import ChatMessage, ChatRequest, GenerateRequest, InvalidRequestError
from runtime.core.structured import constraint_grammar
from runtime.core.tools import NamedTool, Tool, ToolCall, split_calls
from runtime.server.tool_calls import CallHoldback
from tests.helpers import complete_all, greedy, open_runtime

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "minLength": 2}}, "required": ["name"]},
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 9}},
        "required": ["n"],
    },
    {"type": "object", "properties": {"c": {"enum": ["red", "green"]}}, "required": ["c"]},
    {
        "type": "object",
        "properties": {"xs": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3}},
        "required": ["xs"],
    },
    {
        "type": "object",
        "properties": {
            "in": {
                "type": "object",
                "properties": {"code": {"type": "string", "pattern": "^[a-z]{3}$"}},
                "required": ["code"],
            }
        },
        "required": ["in"],
    },
]
jsonschema.validate({"a": [1]}, {"type": "object"})  # builds the validator once, here, not on a test's loop
WEATHER = Tool(
    name="get_weather",
    description="The weather in a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "minLength": 1}},
        "required": ["city"],
    },
)
ADD = Tool(
    name="add",
    parameters={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"]},
)  # fmt: skip


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
async def test_fake_answers_validate_and_repeat(schema: dict[str, Any]) -> None:
    """Every answer parses and matches its schema, ends with EOS (stop), and is the same twice."""
    async with open_runtime("fake", slots=2) as rt:
        first, again = await complete_all(rt, [greedy(f"p {i}", 64, format=schema) for i in (1, 1)])
    jsonschema.validate(json.loads(first.text), schema)
    assert first.done_reason == "stop"
    assert again.text == first.text


async def test_fake_json_object_and_grammar() -> None:
    """``format="json"`` gives an object; a GBNF grammar gives one of its strings, also when sampled."""
    async with open_runtime("fake", slots=2) as rt:
        obj = await rt.complete(greedy("x", 32, format="json"))
        yes_no = [
            await rt.complete(GenerateRequest(prompt=f"q{i}", max_tokens=8, temperature=1.0, seed=i,
                                              grammar='root ::= "yes" | "no"'))
            for i in range(4)
        ]  # fmt: skip
    assert isinstance(json.loads(obj.text), dict)
    assert {c.text for c in yes_no} <= {"yes", "no"}
    assert all(c.done_reason == "stop" for c in yes_no)


@pytest.mark.parametrize("choice", ["required", NamedTool(name="add")])
async def test_fake_tool_call_is_valid(choice: Any) -> None:
    """tool_choice required / named: one call of a given function whose arguments validate."""
    messages = (ChatMessage(role="user", content="weather in Paris?"),)
    request = ChatRequest(
        messages=messages, tools=(WEATHER, ADD), tool_choice=choice, max_tokens=96, temperature=0
    )
    async with open_runtime("fake", slots=1, n_ctx_per_slot=2048) as rt:  # bytes: the tools' prompt is long
        answer = await rt.complete_chat(request)
    assert len(answer.tool_calls) == 1, answer
    call = answer.tool_calls[0]
    tool = {"get_weather": WEATHER, "add": ADD}[call.function.name]
    if isinstance(choice, NamedTool):
        assert call.function.name == "add"
    jsonschema.validate(call.function.arguments, tool.parameters)
    assert answer.text == "" and call.id.startswith("call_")


async def test_constrained_rows_leave_free_greedy_rows_unchanged() -> None:
    """Free greedy rows in a batch with constrained ones equal their solo outputs."""
    free = [greedy(f"free {i}", 24) for i in range(2)]
    async with open_runtime("fake", slots=4) as rt:
        solo = [await rt.complete(r) for r in free]
        mixed = await complete_all(rt, [free[0], greedy("c0", 40, format=SCHEMAS[0]), free[1],
                                        greedy("c1", 40, format=SCHEMAS[2])])  # fmt: skip
    assert [mixed[0].token_ids, mixed[2].token_ids] == [s.token_ids for s in solo]
    for answer, schema in ((mixed[1], SCHEMAS[0]), (mixed[3], SCHEMAS[2])):
        jsonschema.validate(json.loads(answer.text), schema)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": {"type": "objectx"}}, "the JSON schema does not compile: Invalid type: objectx"),
        ({"format": {"type": "object"}, "grammar": 'root ::= "a"'}, "format and grammar are both set"),
        ({"grammar": "root ::= ("}, "the grammar does not compile"),
        ({"grammar": "  "}, "grammar is empty"),
    ],
)
async def test_bad_constraint_is_refused_before_compute(fields: dict[str, Any], message: str) -> None:
    """A bad schema or grammar is an InvalidRequestError when the request is made; the runtime
    then serves the next request."""
    async with open_runtime("fake", slots=1) as rt:
        with pytest.raises(InvalidRequestError, match=message):
            GenerateRequest(prompt="x", **fields)
        steps = rt.backend.steps  # type: ignore[attr-defined]
        answer = await rt.complete(greedy("after", 16, format="json"))
    assert steps == 0
    assert isinstance(json.loads(answer.text), dict) and answer.done_reason == "stop"


def test_tool_choice_checks() -> None:
    messages = (ChatMessage(role="user", content="x"),)
    with pytest.raises(InvalidRequestError, match="tool_choice names 'nope'; the tools are get_weather"):
        ChatRequest(messages=messages, tools=(WEATHER,), tool_choice=NamedTool(name="nope"))
    with pytest.raises(InvalidRequestError, match="tool_choice is required but tools is empty"):
        ChatRequest(messages=messages, tool_choice="required")
    with pytest.raises(InvalidRequestError, match="format and tools are both set"):
        ChatRequest(messages=messages, tools=(WEATHER,), tool_choice="required", format="json")
    assert ChatRequest(messages=messages, tools=(WEATHER,), tool_choice="none").constraint() is None
    assert constraint_grammar(None, None) is None


def test_split_calls_reads_calls_and_leaves_the_rest() -> None:
    text = 'ok <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call> <tool_call>not json</tool_call>'
    rest, calls = split_calls(text)
    assert [(c.function.name, c.function.arguments) for c in calls] == [("f", {"x": 1})]
    assert rest == "ok  <tool_call>not json</tool_call>"
    assert split_calls("plain") == ("plain", ())


def test_holdback_streams_text_and_holds_calls() -> None:
    hold = CallHoldback(True)
    assert hold.take(0, " ") == ""
    assert hold.take(0, "Hi") == " Hi"
    assert hold.take(0, " there") == " there"
    assert hold.finish(0, "!") == ("!", ())
    assert hold.take(1, "<tool") == ""
    text, calls = hold.finish(1, '_call>{"name": "f", "arguments": {}}</tool_call>')
    assert text == "" and isinstance(calls[0], ToolCall) and calls[0].function.name == "f"
    assert CallHoldback(False).take(0, "<x") == "<x"


def test_constraint_size_is_bounded() -> None:
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(4000)}}
    with pytest.raises(InvalidRequestError, match="characters; at most 65,536 are allowed"):
        GenerateRequest(prompt="x", format=huge)


def test_a_template_that_renders_tools_gets_them_and_the_calls() -> None:
    """A template reading ``tools`` renders the tools and the history's calls itself; one that
    does not gets them as system text and ``<tool_call>`` content (runtime.core.tool_prompt)."""
    from actors.prompt import prompt_parts
    from runtime.backends.chat_template import ChatTemplate
    from runtime.backends.fake import FakeBackend
    from runtime.core.tools import FunctionCall

    source = (
        "{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments.a }}]{% endfor %}"
        "{% endfor %}<assistant>"
    )
    call = ToolCall(function=FunctionCall(name="add", arguments={"a": 1, "b": 2}))
    history = (
        ChatMessage(role="user", content="sum"),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="3", tool_call_id=call.id),
    )
    request = ChatRequest(messages=history, tools=(ADD,))
    backend = FakeBackend()
    plain = "".join(p.text for p in prompt_parts(backend, request))
    backend.chat_template = ChatTemplate(source, bos_token="", eos_token="")
    own = "".join(p.text for p in prompt_parts(backend, request))
    assert own == "[tool add]<user>sum<assistant>[call add 1]<tool>3<assistant>"
    assert plain.startswith('<system>You can call these functions:\n{"name": "add"')
    assert '<assistant><tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in plain


async def test_a_backend_that_cannot_constrain_refuses() -> None:
    import msgspec

    from runtime import Runtime, RuntimeConfig
    from runtime.backends.fake import FakeBackend

    backend = FakeBackend(n_seq_max=1)
    backend.info = msgspec.structs.replace(backend.info, constraints=False)
    async with Runtime(RuntimeConfig(backend="fake", slots=1), backend=backend) as rt:
        with pytest.raises(InvalidRequestError, match="the fake backend cannot constrain output"):
            await rt.complete(greedy("x", 4, format="json"))
        assert (await rt.complete(greedy("x", 4))).done_reason == "length"
