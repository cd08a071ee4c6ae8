"""Ollama's generating API: POST /api/generate and /api/chat (NDJSON streams by default); the
model endpoints (/api/tags, /api/ps, /api/show, /api/version) are in ollama_models.py.

A streamed answer is one JSON object per line; the last has ``done: true``, ``done_reason``
and Ollama's counts and durations (tokens; nanoseconds), taken from the request's
RequestStats: total_duration, load_duration, prompt_eval_count (prompt tokens),
prompt_eval_duration (prefill), eval_count (generated tokens), eval_duration (decode).
With ``logprobs`` asked, each object with text carries a ``logprobs`` list for its tokens
(token, logprob, bytes, top_logprobs), as recent Ollama writes it.
A chat with tools answers its calls in ``message.tool_calls`` (streamed: one line with them
before the done line; runtime.server.tool_calls). Errors are ``{"error": "..."}``, also in-band as the last line of a stream. What the option
mapping notices (an option Ollama does not know, a num_ctx above the slot's) is logged as a
warning once per option key or value.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.routing import Route

from runtime.core.messages import ChatRequest, Chunk, Completion, GenerateRequest, RequestStats, TokenLogprob
from runtime.core.tools import ToolCall
from runtime.server.context import ServerContext
from runtime.server.errors import HttpError
from runtime.server.ollama_wire import OllamaChatBody, OllamaGenerateBody, chat_request, generate_request
from runtime.server.tool_calls import CallHoldback, ollama_call

__all__ = ["OLLAMA_ERRORS", "LogOnce", "OllamaApi", "OllamaFraming"]

log = logging.getLogger("slotserve.server")
_encode = msgspec.json.encode


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _timings(stats: RequestStats) -> dict[str, int]:
    return {
        "total_duration": stats.total_duration_ns,
        "load_duration": stats.load_duration_ns,
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": stats.prefill_duration_ns,
        "eval_count": stats.completion_tokens,
        "eval_duration": stats.decode_duration_ns,
    }


def _with_calls(out: dict[str, Any], calls: tuple[ToolCall, ...]) -> dict[str, Any]:
    """``out`` (a chat object) with ``message.tool_calls`` where the answer made calls."""
    if calls:
        out["message"]["tool_calls"] = [ollama_call(c) for c in calls]
    return out


class OllamaFraming:
    """NDJSON frames of /api/generate (``chat=False``: ``response``) or /api/chat (``message``).

    :param pieces: each token id's bytes (the backend's), for the text of log-probabilities.
    :param tools: the answer may hold tool calls (a chat with tools).
    """

    stream_media_type = "application/x-ndjson"

    def __init__(self, model: str, *, chat: bool, pieces: Sequence[bytes] = (), tools: bool = False) -> None:
        self._model = model
        self._chat = chat
        self._pieces = pieces
        self._calls = CallHoldback(tools)

    def _object(self, text: str, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self._model, "created_at": _now()}
        if self._chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out.update(extra)
        return out

    def _with_logprobs(self, out: dict[str, Any], logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
        if logprobs:
            out["logprobs"] = [self._logprob(lp) for lp in logprobs]
        return out

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""
        return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def _logprob(self, lp: TokenLogprob) -> dict[str, Any]:
        """Ollama's record of one token: token, logprob, bytes, top_logprobs."""
        out = self._token(lp.token_id, lp.logprob)
        out["top_logprobs"] = [self._token(t.token_id, t.logprob) for t in lp.top]
        return out

    def _line(self, text: str, logprobs: tuple[TokenLogprob, ...]) -> bytes:
        return _encode(self._with_logprobs(self._object(text, done=False), logprobs)) + b"\n"

    def piece(self, chunk: Chunk) -> bytes:
        """One line: the chunk's text (and log-probabilities), ``done: false``; nothing while
        the text may be a tool call."""
        text = self._calls.take(chunk.index, chunk.text)
        if self._calls.active and not text:
            return b""
        return self._line(text, chunk.logprobs)

    def last(self, chunk: Chunk) -> bytes:
        """The last chunk's text (if any) on its own line, the tool calls' line (if any), then
        the ``done`` line with counts."""
        assert chunk.stats is not None
        text, calls = self._calls.finish(chunk.index, chunk.text)
        head = self._line(text, chunk.logprobs) if text or chunk.logprobs else b""
        if calls:
            head += _encode(_with_calls(self._object("", done=False), calls)) + b"\n"
        end = self._object("", done=True, done_reason=chunk.done_reason, **_timings(chunk.stats))
        return head + _encode(end) + b"\n"

    def whole(self, completion: Completion) -> bytes:
        """The one object of ``"stream": false``."""
        fields = _timings(completion.stats)
        out = self._object(completion.text, done=True, done_reason=completion.done_reason, **fields)
        _with_calls(out, completion.tool_calls)
        return _encode(self._with_logprobs(out, completion.logprobs))

    def loaded(self) -> bytes:
        """Ollama's answer to an empty prompt: the model is loaded (it always is here)."""
        return _encode(self._object("", done=True, done_reason="load"))

    def error(self, error: HttpError) -> bytes:
        """``{"error": message}``."""
        return _encode({"error": error.message})

    def error_frame(self, error: HttpError) -> bytes:
        """The error as the stream's last line (the official client raises it)."""
        return self.error(error) + b"\n"


OLLAMA_ERRORS = OllamaFraming("", chat=False)


def _framing(
    server: ServerContext, *, chat: bool
) -> Callable[[OllamaGenerateBody | OllamaChatBody], OllamaFraming]:
    return lambda body: OllamaFraming(
        body.model, chat=chat, pieces=server.runtime.backend.pieces,
        tools=isinstance(body, OllamaChatBody) and bool(body.tools) and body.tool_choice != "none",
    )  # fmt: skip


class LogOnce:
    """Logs a warning once per key, remembering at most ``max_keys`` keys (then new keys are
    dropped, with one warning saying so): a client sending made-up option names cannot grow it."""

    def __init__(self, max_keys: int = 256) -> None:
        self._seen: set[str] = set()
        self._max_keys = max_keys

    def __call__(self, key: str, message: str) -> None:
        """Log ``message`` unless ``key`` was logged before."""
        if key in self._seen or len(self._seen) > self._max_keys:
            return
        self._seen.add(key)
        if len(self._seen) > self._max_keys:
            log.warning("more than %d different notices; no more are logged", self._max_keys)
            return
        log.warning("%s", message)


class OllamaApi:
    """The generating Ollama endpoints of one app."""

    def __init__(self, server: ServerContext) -> None:
        self._server = server
        self._notice = LogOnce()

    def routes(self) -> list[Route]:
        """The routes, each answering errors in Ollama's format."""
        s = self._server
        generate = s.generation(OllamaGenerateBody, self._generate_request, _framing(s, chat=False))
        chat = s.generation(OllamaChatBody, self._chat_request, _framing(s, chat=True))
        return [
            Route("/api/generate", s.guarded(OLLAMA_ERRORS, generate), methods=["POST"]),
            Route("/api/chat", s.guarded(OLLAMA_ERRORS, chat), methods=["POST"]),
        ]

    def _generate_request(self, body: OllamaGenerateBody) -> GenerateRequest | ChatRequest | Response:
        """POST /api/generate: complete a prompt (templated unless ``raw``); an empty prompt
        only asks that the model be loaded."""
        req = generate_request(body, self._server.runtime.config.n_ctx_per_slot, self._notice)
        if req is None:
            loaded = OllamaFraming(body.model, chat=False).loaded()
            return Response(loaded, media_type="application/json")
        return req

    def _chat_request(self, body: OllamaChatBody) -> ChatRequest:
        """POST /api/chat: answer the messages through the model's chat template."""
        return chat_request(body, self._server.runtime.config.n_ctx_per_slot, self._notice)
