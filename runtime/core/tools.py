"""Tools a chat may call: their definitions, the calls in an answer, and how both become text.

A tool is a function with a name, a description and a JSON schema of its ``parameters``
(OpenAI's and Ollama's ``tools``). The model calls one by writing

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

(the Hermes / Qwen convention that many chat templates use). With ``tool_choice`` required or
a named function the answer is constrained to exactly one such call whose arguments match the
function's schema (runtime.core.structured); with ``auto`` the model may answer in text, and a
call is constrained from its ``<tool_call>`` on. :func:`split_calls` reads the calls back out.

A model whose chat template renders ``tools`` gets them through its template; otherwise
:func:`tool_system_prompt` writes them into the system message (the documented rendering:
README, "Structured output and tools"). An assistant turn's calls are written back as their
``<tool_call>`` text, and a tool's result is a ``tool`` turn.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

import msgspec

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "FunctionCall",
    "NamedTool",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "call_text",
    "split_calls",
    "tool_system_prompt",
]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


class Tool(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A function the model may call (OpenAI's ``tools[].function``)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object"})
    """A JSON schema of the arguments object."""


class NamedTool(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``tool_choice`` naming one function: the answer is a call of it."""

    name: str


ToolChoice = Literal["none", "auto", "required"] | NamedTool
"""``none``: the tools are shown but no call is made; ``auto``: text or a call; ``required``:
a call of one of the tools; a :class:`NamedTool`: a call of that one."""


class FunctionCall(msgspec.Struct, frozen=True, kw_only=True):
    """The function a call names and its arguments (an object, decoded)."""

    name: str
    arguments: dict[str, Any]


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """One call in an answer (``Completion.tool_calls``); ``id`` is OpenAI's ``tool_call_id``."""

    function: FunctionCall
    id: str = msgspec.field(default_factory=lambda: "call_" + secrets.token_hex(12))
    type: Literal["function"] = "function"


def call_text(call: ToolCall) -> str:
    """The text a model writes for ``call`` (an assistant turn's calls in a chat's history)."""
    body = json.dumps({"name": call.function.name, "arguments": call.function.arguments})
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def split_calls(text: str) -> tuple[str, tuple[ToolCall, ...]]:
    """The text outside the answer's calls and the calls in it, in order. A call whose JSON is
    not an object with a string ``name`` and an object ``arguments`` stays in the text."""
    calls: list[ToolCall] = []
    rest: list[str] = []
    last = 0
    for match in _CALL.finditer(text):
        try:
            data = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            continue
        arguments = data.get("arguments", {})
        if not isinstance(arguments, dict):
            continue
        rest.append(text[last : match.start()])
        last = match.end()
        calls.append(ToolCall(function=FunctionCall(name=data["name"], arguments=arguments)))
    if not calls:
        return text, ()
    rest.append(text[last:])
    return "".join(rest).strip(), tuple(calls)


def tool_system_prompt(tools: tuple[Tool, ...], choice: ToolChoice) -> str:
    """The system text that shows ``tools`` to a model whose template does not render them."""
    listing = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}) for t in tools
    )
    if isinstance(choice, NamedTool):
        ask = f"Call the function {choice.name}."
    elif choice == "required":
        ask = "Call one of these functions."
    else:
        ask = "Call one of these functions if it helps to answer; otherwise answer in text."
    return (
        f"You can call these functions:\n{listing}\n{ask} To call a function, answer with "
        f'{CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CALL_CLOSE}'
    )
