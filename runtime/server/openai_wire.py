"""OpenAI's request bodies (POST /v1/chat/completions, /v1/completions) and how they become our
requests. Pure functions of their input, so they can be tested without a server.

Field names follow OpenAI's API reference. Unset sampling fields take slotserve's defaults
(runtime.core.messages), so the same values give the same request as the embedded API. Also
accepted, as llama.cpp's server and vLLM do: ``top_k``, ``min_p``, ``repeat_penalty``,
``repeat_last_n``. ``presence_penalty`` and ``frequency_penalty`` (-2 to 2) go to llama.cpp's
penalties sampler over the last ``repeat_last_n`` generated tokens. ``logprobs`` (chat: true with
``top_logprobs`` 0 to 20; completions: an integer 0 to 20, the top count) gives each token's
log-probability. ``n`` (1 to 128, and at most the slots: each choice takes one) asks for n
choices that share one prompt evaluation (Runtime.generate_choices). ``response_format``
``json_object`` and ``json_schema`` (chat, and /v1/completions as vLLM takes it) constrain the answer (always enforced, ``strict`` or not;
runtime.core.structured); ``tools`` with ``tool_choice`` none, auto, required or a named
function may be called (runtime.core.tools; one call per answer, whatever
``parallel_tool_calls`` says), and the history's ``tool_calls`` and ``tool`` messages (with
``tool_call_id``) are kept. The legacy ``functions`` and ``function_call`` are refused (use
tools). Fields that would change the answer in ways we do not implement (``logit_bias``,
``echo``, ``suffix``) are refused with 400 rather than ignored; fields that do not change the answer (``metadata``, ...) are ignored.
``user`` names the request's tenant (fair shares of the slots; runtime.server.admission_headers).
``max_tokens`` of /v1/completions defaults to 16, as in OpenAI's reference.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from runtime.core.choices import MAX_CHOICES
from runtime.core.errors import InvalidRequestError, preview
from runtime.core.messages import MAX_TOP_LOGPROBS, ChatMessage, ChatRequest, GenerateRequest
from runtime.server.tool_calls import parse_tools, tool_choice_field, wire_call

__all__ = ["OpenAIChatBody", "OpenAICompletionBody", "chat_request", "choice_count", "completion_request"]

COMPLETION_MAX_TOKENS_DEFAULT = 16


class StreamOptions(msgspec.Struct, kw_only=True):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content; only ``text`` parts are supported."""

    type: str
    text: str | None = None


class OpenAIMessage(msgspec.Struct, kw_only=True):
    """One chat message; ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class _Body(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions of llama.cpp's server and vLLM
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class OpenAIChatBody(_Body, kw_only=True):
    """The body of POST /v1/chat/completions (unknown fields are ignored)."""

    messages: list[OpenAIMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may hold tool calls."""
        return bool(self.tools) and self.tool_choice != "none"


class OpenAICompletionBody(_Body, kw_only=True):
    """The body of POST /v1/completions (unknown fields are ignored)."""

    prompt: str | list[str]
    max_tokens: int | None = COMPLETION_MAX_TOKENS_DEFAULT
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    response_format: dict[str, Any] | None = None
    """As the chat's (vLLM takes it here too): text, json_object or json_schema."""


_SAMPLING = (
    "temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
    "presence_penalty", "frequency_penalty",
)  # fmt: skip


def _refuse(field: str, value: object, allowed: str) -> None:
    raise InvalidRequestError(f"{field} is {preview(value)}; slotserve supports only {allowed}")


def choice_count(body: OpenAIChatBody | OpenAICompletionBody) -> int:
    """The body's ``n``: how many choices to generate (1 when unset).

    :raises InvalidRequestError: if it is outside 1 to 128 (OpenAI's range).
    """
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError(f"n is {n}; it must be 1 to {MAX_CHOICES}")
    return n


def _sampling(body: _Body) -> dict[str, Any]:
    if body.logit_bias:
        _refuse("logit_bias", body.logit_bias, "an empty or absent logit_bias")
    fields: dict[str, Any] = {k: getattr(body, k) for k in _SAMPLING if getattr(body, k) is not None}
    if isinstance(body.stop, str):
        fields["stop"] = (body.stop,)
    elif body.stop is not None:
        fields["stop"] = tuple(body.stop)
    return fields


def _content(i: int, content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            _refuse(f"messages[{i}].content[{j}].type", part.type, "'text' parts")
        texts.append(part.text or "")
    return "\n".join(texts)


def _response_format(value: dict[str, Any] | None) -> dict[str, Any]:
    """Our ``format`` from ``response_format``: text (none), json_object or json_schema."""
    kind = "text" if value is None else value.get("type", "text")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"format": "json"}
    if kind == "json_schema":
        assert value is not None
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                f"response_format.json_schema.schema is {preview(schema)}; it must be a JSON schema (an object)"
            )
        return {"format": schema}
    _refuse("response_format.type", kind, "'text', 'json_object' and 'json_schema'")
    return {}


def _message(i: int, m: OpenAIMessage) -> ChatMessage:
    calls = tuple(wire_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(m.tool_calls or ()))
    if m.role == "tool" and not m.tool_call_id:
        raise InvalidRequestError(f"messages[{i}] is a tool message without tool_call_id")
    return ChatMessage(
        role="system" if m.role == "developer" else m.role,
        content=_content(i, m.content),
        tool_calls=calls,
        tool_call_id=m.tool_call_id,
        name=m.name if m.role == "tool" else None,
    )


def chat_request(body: OpenAIChatBody) -> ChatRequest:
    """The request for a /v1/chat/completions body.

    :raises InvalidRequestError: if messages is empty, a field is out of range, a tool or a
        call is malformed, or it asks for what we do not support (the legacy functions).
    """
    if body.functions or body.function_call is not None:
        _refuse("functions", "<the legacy functions / function_call>", "tools and tool_choice")
    fields = _sampling(body) | _response_format(body.response_format)
    if body.tools:
        fields |= {
            "tools": parse_tools("tools", body.tools),
            "tool_choice": tool_choice_field(body.tool_choice),
        }
    elif body.tool_choice not in (None, "none", "auto"):
        _refuse("tool_choice", body.tool_choice, "'none' or 'auto' without tools")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    messages = tuple(_message(i, m) for i, m in enumerate(body.messages))
    if body.logprobs:
        fields["logprobs"] = True
    if body.top_logprobs is not None:
        fields["top_logprobs"] = body.top_logprobs
    return ChatRequest(messages=messages, max_tokens=max_tokens, **fields)


def completion_request(body: OpenAICompletionBody) -> GenerateRequest:
    """The request for a /v1/completions body: the prompt is completed as is (no template).

    :raises InvalidRequestError: if the prompt is empty or not one string, a field is out of
        range, or it asks for what we do not support.
    """
    if body.echo:
        _refuse("echo", body.echo, "false")
    if body.suffix:
        _refuse("suffix", body.suffix, "an empty or absent suffix")
    fields = _sampling(body) | _response_format(body.response_format)
    if body.logprobs is not None:
        k = body.logprobs
        if not 0 <= k <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"logprobs is {k}; it must be 0 to {MAX_TOP_LOGPROBS} (or null)")
        fields |= {"logprobs": True, "top_logprobs": k}
    if body.best_of not in (None, 1):
        _refuse("best_of", body.best_of, "1")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            _refuse("prompt", f"<a list of {len(prompt)} prompts>", "one prompt per request")
        prompt = prompt[0]
    return GenerateRequest(prompt=prompt, max_tokens=body.max_tokens, **fields)
