"""Tool calls on the wire: tools and calls in both APIs' shapes, and a streamed answer's holdback.

Ollama writes a call as ``{"function": {"name", "arguments": {...}}}`` and OpenAI as ``{"id",
"type": "function", "function": {"name", "arguments": "<JSON text>"}}``; both send tools as
``{"type": "function", "function": {"name", "description", "parameters"}}``.

A streamed answer that may hold a call is held back from its first non-blank character on if
that is ``<`` (where a ``<tool_call>`` begins: runtime.core.tools); any other text streams as
it comes. At the end the held text is read for calls (:class:`CallHoldback`), which the framing
sends as Ollama and OpenAI stream them: Ollama one ``message.tool_calls`` line before the done
line, OpenAI one ``delta.tool_calls`` chunk (the whole arguments in it) before the one with
``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
from typing import Any

from runtime.core.errors import InvalidRequestError, preview
from runtime.core.tools import FunctionCall, NamedTool, Tool, ToolCall, ToolChoice, split_calls

__all__ = ["CallHoldback", "ollama_call", "openai_call", "parse_tools", "tool_choice_field", "wire_call"]


def tool_choice_field(value: Any) -> ToolChoice:
    """Our tool_choice from OpenAI's: unset (auto), a mode, or ``{"type": "function",
    "function": {"name": ...}}``.

    :raises InvalidRequestError: for anything else.
    """
    if value is None:
        return "auto"
    if value in ("none", "auto", "required"):
        return value  # type: ignore[no-any-return]
    fn = value.get("function") if isinstance(value, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return NamedTool(name=fn["name"])
    raise InvalidRequestError(
        f"tool_choice is {preview(value)}; slotserve supports only 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}"
    )


def parse_tools(field: str, tools: list[Any]) -> tuple[Tool, ...]:
    """Tools from their wire objects (both APIs' shape).

    :raises InvalidRequestError: if one is not a function with a name, or its parameters are
        not an object.
    """
    out = []
    for i, item in enumerate(tools):
        fn = item.get("function") if isinstance(item, dict) else None
        if (
            not isinstance(item, dict)
            or item.get("type", "function") != "function"
            or not isinstance(fn, dict)
        ):
            raise InvalidRequestError(
                f"{field}[{i}] is {preview(item)}; a tool is {{'type': 'function', 'function': {{'name': ...}}}}"
            )
        name, params = fn.get("name"), fn.get("parameters") or {"type": "object"}
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(
                f"{field}[{i}].function.name is {preview(name)}; it must be a non-empty string"
            )
        if not isinstance(params, dict):
            raise InvalidRequestError(
                f"{field}[{i}].function.parameters is {preview(params)}; it must be a JSON schema"
            )
        out.append(Tool(name=name, description=str(fn.get("description") or ""), parameters=params))
    return tuple(out)


def wire_call(field: str, item: Any) -> ToolCall:
    """A call of a chat's history from either API's shape (arguments an object or JSON text).

    :raises InvalidRequestError: if it has no function name, or its arguments are not an object.
    """
    fn = item.get("function") if isinstance(item, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError(
            f"{field} is {preview(item)}; a call is {{'function': {{'name', 'arguments'}}}}"
        )
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise InvalidRequestError(
                f"{field}.function.arguments is not valid JSON: {preview(arguments)}"
            ) from None
    if not isinstance(arguments, dict):
        raise InvalidRequestError(f"{field}.function.arguments is {preview(arguments)}; it must be an object")
    call = ToolCall(function=FunctionCall(name=fn["name"], arguments=arguments))
    if isinstance(item.get("id"), str):
        call = ToolCall(function=call.function, id=item["id"])
    return call


def ollama_call(call: ToolCall) -> dict[str, Any]:
    """A call as Ollama writes it."""
    return {"function": {"name": call.function.name, "arguments": call.function.arguments}}


def openai_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call as OpenAI writes it (``index`` in a streamed delta)."""
    out: dict[str, Any] = {} if index is None else {"index": index}
    out |= {"id": call.id, "type": "function"}
    out["function"] = {"name": call.function.name, "arguments": json.dumps(call.function.arguments)}
    return out


class CallHoldback:
    """Per choice, the streamed text held back while it may be a tool call (see the module
    docstring); ``active`` False passes every text through."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self._held: dict[int, str] = {}
        self._free: set[int] = set()

    def take(self, index: int, text: str) -> str:
        """What of ``text`` (choice ``index``'s next piece) to send now."""
        if not self.active or index in self._free:
            return text
        held = self._held.get(index, "") + text
        start = held.lstrip()
        if start and not start.startswith("<"):
            self._free.add(index)
            self._held.pop(index, None)
            return held
        self._held[index] = held
        return ""

    def finish(self, index: int, text: str) -> tuple[str, tuple[ToolCall, ...]]:
        """The last piece's text to send, and the calls of the whole answer."""
        if not self.active or index in self._free:
            return text, ()
        return split_calls(self._held.pop(index, "") + text)
