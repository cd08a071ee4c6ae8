"""Ollama's API: POST /api/generate and /api/chat (NDJSON streams by default), GET /api/tags,
/api/ps (with our slots and queue added) and /api/version.

A streamed answer is one JSON object per line; the last has ``done: true``, ``done_reason``
and Ollama's counts and durations (tokens; nanoseconds), taken from the request's
RequestStats: total_duration, load_duration, prompt_eval_count (prompt tokens),
prompt_eval_duration (prefill), eval_count (generated tokens), eval_duration (decode).
Errors are ``{"error": "..."}``, also in-band as the last line of a stream.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Callable
from importlib import metadata
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runtime.core.errors import RuntimeClosedError
from runtime.core.messages import ChatRequest, Chunk, Completion, GenerateRequest, RequestStats
from runtime.server.context import ServerContext
from runtime.server.errors import HttpError
from runtime.server.ollama_wire import OllamaChatBody, OllamaGenerateBody, chat_request, generate_request

__all__ = ["OLLAMA_ERRORS", "OllamaApi", "OllamaFraming"]

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


def version() -> str:
    """slotserve's version (reported by /api/version)."""
    try:
        return metadata.version("slotserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class OllamaFraming:
    """NDJSON frames of /api/generate (``chat=False``: ``response``) or /api/chat (``message``)."""

    stream_media_type = "application/x-ndjson"

    def __init__(self, model: str, *, chat: bool) -> None:
        self._model = model
        self._chat = chat

    def _object(self, text: str, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self._model, "created_at": _now()}
        if self._chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out.update(extra)
        return out

    def piece(self, chunk: Chunk) -> bytes:
        """One line: the chunk's text, ``done: false``."""
        return _encode(self._object(chunk.text, done=False)) + b"\n"

    def last(self, chunk: Chunk) -> bytes:
        """The last chunk's text (if any) on its own line, then the ``done`` line with counts."""
        assert chunk.stats is not None
        head = self.piece(chunk) if chunk.text else b""
        end = self._object("", done=True, done_reason=chunk.done_reason, **_timings(chunk.stats))
        return head + _encode(end) + b"\n"

    def whole(self, completion: Completion) -> bytes:
        """The one object of ``"stream": false``."""
        fields = _timings(completion.stats)
        return _encode(self._object(completion.text, done=True, done_reason=completion.done_reason, **fields))

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


def _framing(*, chat: bool) -> Callable[[OllamaGenerateBody | OllamaChatBody], OllamaFraming]:
    return lambda body: OllamaFraming(body.model, chat=chat)


_PS_FIELDS = (
    "state", "failure", "backend", "n_ctx_per_slot", "kv_bytes_per_slot", "slots_configured", "slots_effective",
    "slots_busy", "queue_depth", "queue_capacity", "requests_admitted", "requests_completed",
    "requests_cancelled", "requests_failed", "requests_rejected", "restarts",
)  # fmt: skip
"""RuntimeStatus fields /api/ps adds under ``slotserve``: our slots and queue."""


class OllamaApi:
    """The Ollama endpoints of one app."""

    def __init__(self, server: ServerContext) -> None:
        self._server = server

    def routes(self) -> list[Route]:
        """The routes, each answering errors in Ollama's format."""
        s = self._server
        generate = s.generation(OllamaGenerateBody, self._generate_request, _framing(chat=False))
        chat = s.generation(OllamaChatBody, self._chat_request, _framing(chat=True))
        return [
            Route("/api/generate", s.guarded(OLLAMA_ERRORS, generate), methods=["POST"]),
            Route("/api/chat", s.guarded(OLLAMA_ERRORS, chat), methods=["POST"]),
            Route("/api/tags", s.guarded(OLLAMA_ERRORS, self.tags), methods=["GET"]),
            Route("/api/ps", s.guarded(OLLAMA_ERRORS, self.ps), methods=["GET"]),
            Route("/api/version", s.guarded(OLLAMA_ERRORS, self.version), methods=["GET"]),
        ]

    def _generate_request(self, body: OllamaGenerateBody) -> GenerateRequest | ChatRequest | Response:
        """POST /api/generate: complete a prompt (templated unless ``raw``); an empty prompt
        only asks that the model be loaded."""
        req = generate_request(body, self._server.runtime.config.n_ctx_per_slot)
        if req is None:
            loaded = OllamaFraming(body.model, chat=False).loaded()
            return Response(loaded, media_type="application/json")
        return req

    def _chat_request(self, body: OllamaChatBody) -> ChatRequest:
        """POST /api/chat: answer the messages through the model's chat template."""
        return chat_request(body, self._server.runtime.config.n_ctx_per_slot)

    def _model(self) -> dict[str, Any]:
        rt = self._server.runtime
        name = self._server.names.primary
        status = rt.status()
        path = rt.config.model
        with contextlib.suppress(RuntimeClosedError):  # loaded: the file it came from
            path = rt.backend.info.path
        try:
            modified = dt.datetime.fromtimestamp(os.stat(path).st_mtime, dt.UTC)
        except OSError:
            modified = dt.datetime.fromtimestamp(self._server.created_s, dt.UTC)
        return {
            "name": name,
            "model": name,
            "modified_at": modified.isoformat().replace("+00:00", "Z"),
            "size": status.weights_bytes,
            "digest": "",
            "details": {
                "parent_model": "",
                "format": "gguf" if status.backend == "llama_cpp" else status.backend,
                "family": "",
                "families": [],
                "parameter_size": "",
                "quantization_level": "",
            },
        }

    async def tags(self, request: Request) -> Response:
        """GET /api/tags: the one model this server serves."""
        return Response(_encode({"models": [self._model()]}), media_type="application/json")

    async def ps(self, request: Request) -> Response:
        """GET /api/ps: the model if it is loaded, with its memory (bytes), and our slots and queue."""
        if self._server.runtime.status().state in ("loading", "closed"):  # nothing loaded
            return Response(_encode({"models": []}), media_type="application/json")
        status = self._server.runtime.status()
        size = status.weights_bytes + status.slots_effective * status.kv_bytes_per_slot
        gpu = self._server.runtime.backend.info.gpu_layers > 0
        model = self._model() | {
            "size": size,
            "size_vram": size if gpu else 0,
            "expires_at": None,  # never unloaded while the server runs
            "context_length": status.n_ctx_per_slot,
            "slotserve": {k: getattr(status, k) for k in _PS_FIELDS},
        }
        return Response(_encode({"models": [model]}), media_type="application/json")

    async def version(self, request: Request) -> Response:
        """GET /api/version: slotserve's version."""
        return Response(_encode({"version": version()}), media_type="application/json")
