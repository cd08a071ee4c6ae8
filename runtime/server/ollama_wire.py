"""Ollama's request bodies (POST /api/generate, /api/chat) and how they become our requests.

Field names follow Ollama's API documentation. Pure functions of their input, so they can be
tested without a server. Options map to our request fields:

=================  ==============================================================
Ollama option      slotserve
=================  ==============================================================
num_predict        max_tokens; -1 (infinite) and -2 (fill the context) mean None:
                   until the slot's context is full, at most ``max_tokens_cap``
temperature,       the same fields; unset ones take slotserve's defaults
top_k, top_p,      (runtime.core.messages), not Ollama's
min_p, seed,
repeat_penalty,
repeat_last_n,
stop
num_ctx            accepted if it fits the slot (``n_ctx_per_slot``); else 400
typical_p, tfs_z,  accepted only at their neutral values (1, 1, 0, 0, 0): we do
presence_penalty,  not implement them, and silently ignoring them would change
frequency_penalty, the answer the client asked for
mirostat
load-time options  (num_gpu, num_thread, num_batch, use_mmap, ...) accepted and
                   ignored: in slotserve they are server settings (RuntimeConfig)
=================  ==============================================================

An option Ollama does not know is refused (400, naming it).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from runtime.core.errors import InvalidRequestError, preview
from runtime.core.messages import ChatMessage, ChatRequest, GenerateRequest

__all__ = ["OllamaChatBody", "OllamaGenerateBody", "OllamaOptions", "chat_request", "generate_request"]

Role = Literal["system", "user", "assistant", "tool"]


class OllamaOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Ollama's ``options`` object."""

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
    # accepted only at their neutral value
    typical_p: float = 1.0
    tfs_z: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
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
    options: OllamaOptions | None = None
    keep_alive: Any = None
    """Ignored: the model stays loaded for the server's life."""
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    format: Any = None
    think: Any = None


class OllamaChatBody(msgspec.Struct, kw_only=True):
    """The body of POST /api/chat (unknown fields are ignored, as Ollama does)."""

    model: str
    messages: list[OllamaMessage] = msgspec.field(default_factory=list)
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: Any = None
    tools: list[Any] | None = None
    format: Any = None
    think: Any = None


_NEUTRAL = {"typical_p": 1.0, "tfs_z": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0}
_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n")


def _refuse_unsupported(field: str, value: object) -> None:
    if value:
        raise InvalidRequestError(
            f"{field} is {preview(value)}; slotserve does not support {field} (leave it unset)"
        )


def sampling_fields(options: OllamaOptions | None, n_ctx_per_slot: int) -> dict[str, Any]:
    """Our request's sampling fields from Ollama's ``options``.

    :raises InvalidRequestError: if an option is out of range or not supported at its value.
    """
    if options is None:
        return {}
    for name, neutral in _NEUTRAL.items():
        value = getattr(options, name)
        if value != neutral:
            raise InvalidRequestError(
                f"options.{name} is {preview(value)}; slotserve supports only {neutral!r} (not implemented)"
            )
    fields: dict[str, Any] = {k: getattr(options, k) for k in _SAMPLING if getattr(options, k) is not None}
    n = options.num_predict
    if n is not None and n not in (-1, -2):
        if n < 1:
            raise InvalidRequestError(
                f"options.num_predict is {n}; it must be >= 1, or -1 / -2 for 'until the context is full'"
            )
        fields["max_tokens"] = n
    if options.seed is not None and options.seed != -1:  # -1: a random seed, as in llama.cpp
        fields["seed"] = options.seed
    if options.stop is not None:
        fields["stop"] = tuple(options.stop)
    ctx = options.num_ctx
    if ctx is not None and not 1 <= ctx <= n_ctx_per_slot:
        raise InvalidRequestError(
            f"options.num_ctx is {ctx}; each slot holds {n_ctx_per_slot:,} tokens (n_ctx_per_slot), "
            "so num_ctx must be 1 to that"
        )
    return fields


def generate_request(body: OllamaGenerateBody, n_ctx_per_slot: int) -> GenerateRequest | ChatRequest | None:
    """The request for an /api/generate body; None for an empty prompt (Ollama: load the model).

    Like Ollama, the prompt goes through the model's chat template (as one user message, after
    ``system`` if given) unless ``raw`` is true; a raw prompt is the caller's whole template, so
    the special tokens written in it are read as such (``parse_special``).

    :raises InvalidRequestError: if a field is out of range or asks for what we do not support.
    """
    _refuse_unsupported("suffix", body.suffix)
    _refuse_unsupported("template", body.template)
    _refuse_unsupported("context", body.context)
    _refuse_unsupported("images", body.images)
    _refuse_unsupported("format", body.format)
    _refuse_unsupported("think", body.think)
    fields = sampling_fields(body.options, n_ctx_per_slot)
    if not body.prompt:
        return None
    if body.raw:
        return GenerateRequest(prompt=body.prompt, parse_special=True, **fields)
    messages = [ChatMessage(role="user", content=body.prompt)]
    if body.system:
        messages.insert(0, ChatMessage(role="system", content=body.system))
    return ChatRequest(messages=tuple(messages), **fields)


def chat_request(body: OllamaChatBody, n_ctx_per_slot: int) -> ChatRequest:
    """The request for an /api/chat body.

    :raises InvalidRequestError: if messages is empty, a field is out of range, or it asks for
        what we do not support (images, tools, structured output, thinking).
    """
    _refuse_unsupported("tools", body.tools)
    _refuse_unsupported("format", body.format)
    _refuse_unsupported("think", body.think)
    for i, m in enumerate(body.messages):
        _refuse_unsupported(f"messages[{i}].images", m.images)
        _refuse_unsupported(f"messages[{i}].tool_calls", m.tool_calls)
    fields = sampling_fields(body.options, n_ctx_per_slot)
    messages = tuple(ChatMessage(role=m.role, content=m.content) for m in body.messages)
    return ChatRequest(messages=messages, **fields)
