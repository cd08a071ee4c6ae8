"""A request's output constraint as one llguidance grammar, checked before any compute.

The engine is llguidance (llama.cpp's optional engine): chosen by measurement over llama.cpp's
own grammar sampler and xgrammar (``python -m runtime.bench.grammar_engines``; README,
"Structured output and tools"). This module turns what a request asks for into the grammar
text llguidance takes, and validates it without a tokenizer; the backends compile it against
their vocabulary (runtime.backends.grammar). Nothing here converts schemas itself: llguidance
reads JSON schemas, Lark and GBNF.

- ``format="json"``: any JSON object (Ollama's ``format: "json"``, OpenAI's ``json_object``).
- ``format={...}``: a JSON schema (Ollama's ``format``, OpenAI's ``json_schema``).
- ``grammar``: a GBNF grammar (llama.cpp's ``grammar``) or a Lark grammar (llguidance's syntax).
- tools with ``tool_choice`` required or named: one ``<tool_call>`` whose JSON names one of the
  functions with arguments matching its parameters; ``auto``: free text that does not begin
  with ``<``, or such a call.

JSON is generated compactly (``", "`` and ``": "`` between items, no other whitespace): a small
model left free to write whitespace can write it for ever.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from runtime.core.errors import InvalidRequestError
from runtime.core.tools import CALL_CLOSE, CALL_OPEN, NamedTool, Tool, ToolChoice

__all__ = ["JSON_OPTIONS", "MAX_GRAMMAR_CHARS", "constraint_grammar", "tool_call_schema"]

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON options (``x-guidance``) for every schema."""
MAX_GRAMMAR_CHARS = 1 << 16
"""The longest schema or grammar text a request may send (as JSON). Validating runs where the
request is made, on the event loop for the HTTP server: 64 KiB of schema takes about 0.1 s."""


def _with_options(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}


def tool_call_schema(tools: tuple[Tool, ...], choice: ToolChoice) -> dict[str, Any]:
    """The JSON schema of one call of ``tools`` (only the named one for a NamedTool)."""
    chosen = [t for t in tools if not isinstance(choice, NamedTool) or t.name == choice.name]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


@functools.lru_cache(maxsize=256)
def _compiled(key: str) -> str:
    """The grammar text for a constraint, encoded as JSON ``key`` (cached: one validation per
    distinct schema)."""
    import llguidance

    kind, body, extra = json.loads(key)
    try:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(_with_options(body))
        elif kind == "grammar":
            grammar = llguidance.grammar_from("gbnf", body)
        else:  # tools: body is the call schema, extra says whether text may come instead
            call = json.dumps(_with_options(body))
            lark = f'start: tool\ntool: "{CALL_OPEN}" call "{CALL_CLOSE}"\ncall: %json {call}\n'
            if extra:
                lark = lark.replace("start: tool", "start: tool | free") + "free: /(?s:[^<].*)?/\n"
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    except ValueError as exc:
        raise InvalidRequestError(f"the {_what(kind)} does not compile: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"the {_what(kind)} does not compile: {error}")
    return str(grammar)


def _what(kind: str) -> str:
    return {"json": "JSON schema", "grammar": "grammar", "tools": "tools' parameters schema"}[kind]


def constraint_grammar(
    fmt: str | dict[str, Any] | None,
    grammar: str | None,
    tools: tuple[Tool, ...] = (),
    tool_choice: ToolChoice = "auto",
) -> str | None:
    """The llguidance grammar for a request's ``format``, ``grammar`` and tools; None when the
    output is free. Cached by the constraint's text.

    :raises InvalidRequestError: if more than one constraint is given, the format is neither
        ``"json"`` nor a schema, a text is over MAX_GRAMMAR_CHARS, a named tool is not among the
        tools, or the schema or grammar does not compile (llguidance's message included).
    """
    asked = [n for n, v in (("format", fmt), ("grammar", grammar)) if v is not None]
    if tools and tool_choice != "none":
        asked.append("tools")
    if len(asked) > 1:
        raise InvalidRequestError(
            f"{' and '.join(asked)} are both set; a request takes one output constraint"
        )
    if fmt is not None:
        if fmt == "json":
            fmt = {"type": "object"}
        if not isinstance(fmt, dict):
            raise InvalidRequestError(f"format is {fmt!r}; give 'json' or a JSON schema (an object)")
        key = json.dumps(["json", fmt, None], sort_keys=True)
    elif grammar is not None:
        if not grammar.strip():
            raise InvalidRequestError("grammar is empty; give a GBNF or Lark grammar")
        key = json.dumps(["grammar", grammar, None])
    elif tools and tool_choice != "none":
        if isinstance(tool_choice, NamedTool) and tool_choice.name not in {t.name for t in tools}:
            names = ", ".join(t.name for t in tools)
            raise InvalidRequestError(f"tool_choice names {tool_choice.name!r}; the tools are {names}")
        schema = tool_call_schema(tools, tool_choice)
        key = json.dumps(["tools", schema, tool_choice == "auto"], sort_keys=True)
    else:
        return None
    if len(key) > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(
            f"the output constraint is {len(key):,} characters; at most {MAX_GRAMMAR_CHARS:,} are allowed"
        )
    return _compiled(key)
