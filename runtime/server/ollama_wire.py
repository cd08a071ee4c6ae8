"""Ollama's request bodies (POST /api/generate, /api/chat) and how they become our requests.

Field names follow Ollama's API documentation. Pure functions of their input, so they can be
tested without a server. Options map to our request fields:

=================  ==============================================================
Ollama option      slotserve
=================  ==============================================================
num_predict        max_tokens, an upper bound (``overflow="stop"``): generation stops
                   when the slot's context is full or at ``max_tokens_cap``, with
                   done_reason ``length``, as Ollama stops at its window; -1 (infinite)
                   and -2 (fill the context) mean None: until the context is full
temperature,       the same fields; unset ones take slotserve's defaults
top_k, top_p,      (runtime.core.messages), not Ollama's; presence and
min_p, seed,       frequency penalties (-2 to 2) act with repeat_penalty
repeat_penalty,    in llama.cpp's penalties sampler, over the last
repeat_last_n,     repeat_last_n generated tokens
presence_penalty,
frequency_penalty,
stop
num_ctx            the slot's context is used: a num_ctx above ``n_ctx_per_slot`` is
                   clamped to it (logged once per value), one below it changes nothing
typical_p, tfs_z,  accepted only at their neutral values (1, 1, 0): we do not
mirostat           implement them, and silently ignoring them would change the
                   answer the client asked for
load-time options  (num_gpu, num_thread, num_batch, use_mmap, ...) accepted and
                   ignored: in slotserve they are server settings (RuntimeConfig)
=================  ==============================================================

``format`` (``"json"`` or a JSON schema) constrains the answer (runtime.core.structured);
/api/chat's ``tools`` may be called (the answer's ``message.tool_calls``; runtime.core.tools;
the model chooses, as in Ollama, unless the body has slotserve's extension ``tool_choice``, as
OpenAI's),
and the history's assistant ``tool_calls`` and ``tool`` turns (with ``tool_name``) are kept.

The body's ``logprobs`` (true) and ``top_logprobs`` (0 to 20; ignored without ``logprobs``) add
a ``logprobs`` list to each answer object: token, logprob, bytes and top_logprobs per token.

An option Ollama does not know is ignored, with one warning per key in the log (Ollama warns
"invalid option provided" and goes on). ``keep_alive`` is validated as Ollama reads it (seconds,
or a Go duration such as ``"5m"``; negative: forever) and otherwise ignored: the one model stays
loaded for the server's life.

The mapping functions are pure; what they would log goes to a ``notice(key, message)``
callback, which the API logs once per key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from runtime.core.errors import InvalidRequestError, preview
from runtime.core.messages import MAX_TOKENS_LIMIT, ChatMessage, ChatRequest, GenerateRequest
from runtime.server.tool_calls import parse_tools, tool_choice_field, wire_call

__all__ = [
    "Notice",
    "OllamaChatBody",
    "OllamaGenerateBody",
    "OllamaOptions",
    "chat_request",
    "generate_request",
    "keep_alive_s",
]

Role = Literal["system", "user", "assistant", "tool"]
KeepAlive = str | int | float | None
Notice = Callable[[str, str], None]
"""``notice(key, message)``: something worth a warning in the log, once per ``key``."""


def _no_notice(key: str, message: str) -> None:
    pass


class OllamaOptions(msgspec.Struct, kw_only=True):
    """Ollama's ``options`` object (the options it knows; others are ignored with a notice)."""

    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    num_ctx: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # accepted only at their neutral value
    typical_p: float = 1.0
    tfs_z: float = 1.0
    mirostat: int = 0
    # load-time settings and no-ops here: accepted, ignored
    mirostat_tau: Any = None
    mirostat_eta: Any = None
    penalize_newline: Any = None
    num_keep: Any = None
    num_batch: Any = None
    num_gpu: Any = None
    main_gpu: Any = None
    num_thread: Any = None
    numa: Any = None
    low_vram: Any = None
    f16_kv: Any = None
    vocab_only: Any = None
    use_mmap: Any = None
    use_mlock: Any = None
    logits_all: Any = None
    embedding_only: Any = None


class OllamaMessage(msgspec.Struct, kw_only=True):
    """One message of /api/chat."""

    role: Role
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None
    thinking: str | None = None
    tool_name: str | None = None


class OllamaGenerateBody(msgspec.Struct, kw_only=True):
    """The body of POST /api/generate (unknown fields are ignored, as Ollama does)."""

    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    """Validated (:func:`keep_alive_s`), then ignored: the model stays loaded for the server's life."""
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    format: Any = None
    think: Any = None
    logprobs: bool = False
    top_logprobs: int = 0


class OllamaChatBody(msgspec.Struct, kw_only=True):
    """The body of POST /api/chat (unknown fields are ignored, as Ollama does)."""

    model: str
    messages: list[OllamaMessage] = msgspec.field(default_factory=list)
    stream: bool = True
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    """slotserve's extension (Ollama has none: the model chooses): OpenAI's tool_choice."""
    format: Any = None
    think: Any = None
    logprobs: bool = False
    top_logprobs: int = 0


_NEUTRAL = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0}
_SAMPLING = (
    "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
    "frequency_penalty",
)  # fmt: skip
_KNOWN = frozenset(OllamaOptions.__struct_fields__)
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_s(value: KeepAlive) -> float | None:
    """Seconds ``keep_alive`` asks the model to stay loaded, as Ollama reads it: a number is
    whole seconds, a string a Go duration (``"5m"``, ``"1h30m"``, ``"0"``); negative means
    forever (``math.inf``). None when unset.

    :raises InvalidRequestError: if the string is not a duration.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        return math.inf if value < 0 else float(math.trunc(value))
    sign, body = (value[0], value[1:]) if value[:1] in ("-", "+") else ("", value)
    if body == "0":
        return 0.0
    if not _DURATION.fullmatch(body):
        raise InvalidRequestError(
            f"keep_alive is {preview(value)}; give seconds (a number) or a duration such as "
            "'5m' or '1h30m' (negative: keep the model loaded)"
        )
    if sign == "-":
        return math.inf
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(body))


def _refuse_unsupported(field: str, value: object) -> None:
    if value:
        raise InvalidRequestError(
            f"{field} is {preview(value)}; slotserve does not support {field} (leave it unset)"
        )


def _options(raw: dict[str, Any] | None, notice: Notice) -> OllamaOptions | None:
    """Typed options; each key Ollama does not know is noticed and ignored."""
    if raw is None:
        return None
    for key in sorted(raw.keys() - _KNOWN):
        name = preview(key)
        notice(f"option {name}", f"options.{name} is not an Ollama option; ignored (as Ollama does)")
    try:
        return msgspec.convert(raw, OllamaOptions)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(str(exc).replace("- at `$", "- at `$.options", 1)) from None


def sampling_fields(
    raw_options: dict[str, Any] | None, n_ctx_per_slot: int, notice: Notice = _no_notice
) -> dict[str, Any]:
    """Our request's sampling fields from Ollama's ``options`` (see the module docstring).

    :raises InvalidRequestError: if an option is of the wrong type, out of range, or not
        supported at its value.
    """
    options = _options(raw_options, notice)
    fields: dict[str, Any] = {"overflow": "stop"}
    if options is None:
        return fields
    for name, neutral in _NEUTRAL.items():
        value = getattr(options, name)
        if value != neutral:
            raise InvalidRequestError(
                f"options.{name} is {preview(value)}; slotserve supports only {neutral!r} (not implemented)"
            )
    fields |= {k: getattr(options, k) for k in _SAMPLING if getattr(options, k) is not None}
    n = options.num_predict
    if n is not None and n not in (-1, -2):
        if n < 1:
            raise InvalidRequestError(
                f"options.num_predict is {n}; it must be >= 1, or -1 / -2 for 'until the context is full'"
            )
        fields["max_tokens"] = min(n, MAX_TOKENS_LIMIT)  # an upper bound: it stops at the window
    if options.seed is not None and options.seed != -1:  # -1: a random seed, as in llama.cpp
        fields["seed"] = options.seed
    if options.stop is not None:
        fields["stop"] = tuple(options.stop)
    ctx = options.num_ctx
    if ctx is not None and ctx < 1:
        raise InvalidRequestError(f"options.num_ctx is {ctx}; it must be >= 1")
    if ctx is not None and ctx > n_ctx_per_slot:
        notice(
            f"num_ctx {ctx}",
            f"options.num_ctx is {ctx:,}; each slot holds {n_ctx_per_slot:,} tokens (n_ctx_per_slot), "
            f"so {n_ctx_per_slot:,} are used",
        )
    return fields


def format_field(value: Any) -> dict[str, Any]:
    """Our ``format`` from Ollama's: ``"json"``, a JSON schema, or unset (``""`` or null).

    :raises InvalidRequestError: if it is another string or not an object.
    """
    if value in (None, ""):
        return {}
    if value == "json" or isinstance(value, dict):
        return {"format": value}
    raise InvalidRequestError(f'format is {preview(value)}; give "json" or a JSON schema (an object)')


def _logprob_fields(logprobs: bool, top_logprobs: int) -> dict[str, Any]:
    return {"logprobs": True, "top_logprobs": top_logprobs} if logprobs else {}


def generate_request(
    body: OllamaGenerateBody, n_ctx_per_slot: int, notice: Notice = _no_notice
) -> GenerateRequest | ChatRequest | None:
    """The request for an /api/generate body; None for an empty prompt (Ollama: load the model).

    Like Ollama, the prompt goes through the model's chat template (as one user message, after
    ``system`` if given) unless ``raw`` is true; a raw prompt is the caller's whole template, so
    the special tokens written in it are read as such (``parse_special``).

    :raises InvalidRequestError: if a field is out of range or asks for what we do not support.
    """
    keep_alive_s(body.keep_alive)
    _refuse_unsupported("suffix", body.suffix)
    _refuse_unsupported("template", body.template)
    _refuse_unsupported("context", body.context)
    _refuse_unsupported("images", body.images)
    _refuse_unsupported("think", body.think)
    fields = sampling_fields(body.options, n_ctx_per_slot, notice)
    fields |= _logprob_fields(body.logprobs, body.top_logprobs) | format_field(body.format)
    if not body.prompt:
        return None
    if body.raw:
        return GenerateRequest(prompt=body.prompt, parse_special=True, **fields)
    messages = [ChatMessage(role="user", content=body.prompt)]
    if body.system:
        messages.insert(0, ChatMessage(role="system", content=body.system))
    return ChatRequest(messages=tuple(messages), **fields)


def chat_request(body: OllamaChatBody, n_ctx_per_slot: int, notice: Notice = _no_notice) -> ChatRequest:
    """The request for an /api/chat body.

    :raises InvalidRequestError: if messages is empty, a field is out of range, a tool or a
        call is malformed, or it asks for what we do not support (images, thinking).
    """
    keep_alive_s(body.keep_alive)
    _refuse_unsupported("think", body.think)
    for i, m in enumerate(body.messages):
        _refuse_unsupported(f"messages[{i}].images", m.images)
    fields = sampling_fields(body.options, n_ctx_per_slot, notice)
    fields |= _logprob_fields(body.logprobs, body.top_logprobs) | format_field(body.format)
    if body.tools:
        fields["tools"] = parse_tools("tools", body.tools)
        fields["tool_choice"] = tool_choice_field(body.tool_choice)
    messages = tuple(
        ChatMessage(
            role=m.role,
            content=m.content,
            tool_calls=tuple(
                wire_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(m.tool_calls or ())
            ),
            name=m.tool_name,
        )
        for i, m in enumerate(body.messages)
    )
    return ChatRequest(messages=messages, **fields)
