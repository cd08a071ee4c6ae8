"""OpenAI's API: POST /v1/chat/completions and /v1/completions, GET /v1/models and
/v1/models/{id} (any name the model answers to; another is 404 with code ``model_not_found``).

With ``"stream": true`` the answer is server-sent events, ``data: {json}`` each, ending with
``data: [DONE]``; ``finish_reason`` is null on every chunk but the last, and with
``stream_options.include_usage`` one more chunk with empty ``choices`` carries ``usage``.
A chat whose answer made tool calls has ``message.tool_calls`` (``content`` null when
it wrote nothing else) and ``finish_reason: "tool_calls"``; streamed, one chunk carries
``delta.tool_calls`` whole (runtime.server.tool_calls). Errors are OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``, also
in-band as the last event before ``[DONE]``; a prompt plus max_tokens over the slot's context
is code ``context_length_exceeded``. Asked for, each choice's ``logprobs`` holds OpenAI's
records of its tokens (chat: ``content`` with token, logprob, bytes, top_logprobs; completions:
tokens, token_logprobs, top_logprobs, text_offset), in every streamed chunk for its own tokens. Every completion object and chunk carries a
``system_fingerprint``: ``fp_`` and 12 hex digits of what shapes the answers (slotserve's
version, the backend, the model file, the slot's context, the KV cache type, GPU layers).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runtime.core.errors import RuntimeClosedError
from runtime.core.messages import Chunk, Completion, RequestStats, TokenLogprob
from runtime.core.tools import ToolCall
from runtime.server.context import ServerContext
from runtime.server.errors import HttpError
from runtime.server.ollama_models import calls_tools, capabilities
from runtime.server.openai_wire import (
    OpenAIChatBody,
    OpenAICompletionBody,
    chat_request,
    choice_count,
    completion_request,
)
from runtime.server.tool_calls import CallHoldback, openai_call
from runtime.server.versions import slotserve_version

__all__ = ["OPENAI_ERRORS", "OpenAIApi", "OpenAIFraming"]

_encode = msgspec.json.encode
_DONE = b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + _encode(data) + b"\n\n"


def usage(first: RequestStats, *others: RequestStats) -> dict[str, Any]:
    """OpenAI's ``usage`` object from our stats (tokens): with n choices, the prompt once (as
    OpenAI counts it: it was evaluated once) and every choice's completion tokens."""
    completion = first.completion_tokens + sum(s.completion_tokens for s in others)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.prompt_tokens_cached},
    }


def _finish(completion: Completion) -> str:
    """OpenAI's finish_reason of an answer: ``tool_calls`` when it made calls."""
    return "tool_calls" if completion.tool_calls else completion.done_reason


class OpenAIFraming:
    """Objects and SSE frames of /v1/chat/completions (``chat=True``) or /v1/completions.

    :param pieces: each token id's bytes (the backend's), for the text of log-probabilities.
    """

    stream_media_type = "text/event-stream"

    def __init__(
        self,
        model: str,
        *,
        chat: bool,
        include_usage: bool = False,
        system_fingerprint: str = "",
        pieces: Sequence[bytes] = (),
        tools: bool = False,
    ) -> None:
        self._calls = CallHoldback(tools)
        self._model = model
        self._chat = chat
        self._fingerprint = system_fingerprint
        self._include_usage = include_usage
        self._pieces = pieces
        self._id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self._created = int(time.time())
        self._role_sent: set[int] = set()
        self._text_offset: dict[int, int] = {}
        """Completions' ``text_offset`` per choice: characters of its answer before the next chunk."""
        self._stats: list[RequestStats] = []
        """The stats of the choices that ended so far (n > 1: usage sums them)."""

    def _object(self, choices: list[dict[str, Any]], *, streamed: bool, **extra: Any) -> dict[str, Any]:
        kind = ("chat.completion" if self._chat else "text_completion") + (
            ".chunk" if streamed and self._chat else ""
        )
        out = {
            "id": self._id,
            "object": kind,
            "created": self._created,
            "model": self._model,
            "system_fingerprint": self._fingerprint,
            "choices": choices,
        }
        out.update(extra)
        return out

    def _choice(
        self,
        index: int,
        text: str,
        finish_reason: str | None,
        logprobs: tuple[TokenLogprob, ...],
        *,
        streamed: bool,
        calls: tuple[ToolCall, ...] = (),
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if not self._chat:
            choice["text"] = text
        elif streamed:
            choice["delta"] = {} if (finish_reason or calls) and not text else {"content": text}
            if index not in self._role_sent:
                choice["delta"]["role"] = "assistant"
                self._role_sent.add(index)
        else:
            choice["message"] = {"role": "assistant", "content": text}
        if calls:
            key = "delta" if streamed else "message"
            choice.setdefault(key, {})["tool_calls"] = [
                openai_call(c, i if streamed else None) for i, c in enumerate(calls)
            ]
            if not streamed and not text:
                choice["message"]["content"] = None
        choice["logprobs"] = self._logprobs(index, logprobs) if logprobs else None
        choice["finish_reason"] = finish_reason
        return choice

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""
        return raw.decode(errors="replace"), list(raw)

    def _logprobs(self, index: int, logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
        """OpenAI's ``logprobs`` of a choice: chat's ``content`` list, or completions' four
        parallel lists (``text_offset`` counts characters of the answer from its start)."""
        if self._chat:
            content = []
            for lp in logprobs:
                token, raw = self._token(lp.token_id)
                top = []
                for t in lp.top:
                    text, b = self._token(t.token_id)
                    top.append({"token": text, "logprob": t.logprob, "bytes": b})
                content.append({"token": token, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
            return {"content": content, "refusal": None}
        tokens, offsets = [], []
        offset = self._text_offset.get(index, 0)
        for lp in logprobs:
            token = self._token(lp.token_id)[0]
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
        self._text_offset[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{self._token(t.token_id)[0]: t.logprob for t in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }

    def _chunk(
        self,
        index: int,
        text: str,
        finish_reason: str | None,
        logprobs: tuple[TokenLogprob, ...] = (),
        calls: tuple[ToolCall, ...] = (),
    ) -> bytes:
        extra = {"usage": None} if self._include_usage else {}
        choice = self._choice(index, text, finish_reason, logprobs, streamed=True, calls=calls)
        return _event(self._object([choice], streamed=True, **extra))

    def piece(self, chunk: Chunk) -> bytes:
        """One event with the chunk's text (and log-probabilities) and ``finish_reason: null``
        (none while the text may be a tool call); the last chunk of one of n choices adds its
        event with ``finish_reason``."""
        if chunk.done:
            return self._ending(chunk)
        text = self._calls.take(chunk.index, chunk.text)
        if self._calls.active and not text:
            return b""
        return self._chunk(chunk.index, text, None, chunk.logprobs)

    def _ending(self, chunk: Chunk) -> bytes:
        assert chunk.stats is not None
        self._stats.append(chunk.stats)
        text, calls = self._calls.finish(chunk.index, chunk.text)
        frames = [self._chunk(chunk.index, text, None, chunk.logprobs)] if text or chunk.logprobs else []
        if calls:
            frames.append(self._chunk(chunk.index, "", None, calls=calls))
        frames.append(self._chunk(chunk.index, "", "tool_calls" if calls else chunk.done_reason))
        return b"".join(frames)

    def last(self, chunk: Chunk) -> bytes:
        """The last text (if any), the event with ``finish_reason``, usage if asked (summed over
        the choices), ``[DONE]``."""
        frames = [self._ending(chunk)]
        if self._include_usage:
            frames.append(_event(self._object([], streamed=True, usage=usage(*self._stats))))
        frames.append(_DONE)
        return b"".join(frames)

    def whole(self, completion: Completion) -> bytes:
        """The completion object of a request that is not streamed."""
        return self.whole_choices([completion])

    def whole_choices(self, completions: list[Completion]) -> bytes:
        """The completion object of n choices, indexed 0 to n - 1, not streamed."""
        choices = [
            self._choice(i, c.text, _finish(c), c.logprobs, streamed=False, calls=c.tool_calls)
            for i, c in enumerate(completions)
        ]
        return _encode(self._object(choices, streamed=False, usage=usage(*(c.stats for c in completions))))

    def error(self, error: HttpError) -> bytes:
        """OpenAI's error object."""
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        return _encode({"error": {"message": error.message, "type": kind, "param": None, "code": error.code}})

    def error_frame(self, error: HttpError) -> bytes:
        """The error object as an event, then ``[DONE]`` (the official client raises it)."""
        return b"data: " + self.error(error) + b"\n\n" + _DONE


OPENAI_ERRORS = OpenAIFraming("", chat=True)


def system_fingerprint(server: ServerContext) -> str:
    """OpenAI's ``system_fingerprint`` of this server's configuration (see the module docstring)."""
    config = server.runtime.config
    file = server.facts.file()
    parts = (slotserve_version(), config.backend, str(file or server.names.primary), config.n_ctx_per_slot,
             config.kv_cache_type, config.n_gpu_layers)  # fmt: skip
    return "fp_" + hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


class OpenAIApi:
    """The OpenAI endpoints of one app."""

    def __init__(self, server: ServerContext) -> None:
        self._server = server
        self._fingerprint = system_fingerprint(server)

    def _framing(self, *, chat: bool) -> Callable[[OpenAIChatBody | OpenAICompletionBody], OpenAIFraming]:
        fingerprint, server = self._fingerprint, self._server
        return lambda body: OpenAIFraming(
            body.model, chat=chat, include_usage=body.include_usage, system_fingerprint=fingerprint,
            pieces=server.runtime.backend.pieces,
            tools=isinstance(body, OpenAIChatBody) and body.calls_tools,
        )  # fmt: skip

    def routes(self) -> list[Route]:
        """The routes, each answering errors with OpenAI's error object: POST
        /v1/chat/completions answers the messages through the model's chat template, POST
        /v1/completions completes the prompt as is."""
        s = self._server
        chat = s.generation(OpenAIChatBody, chat_request, self._framing(chat=True), choice_count)
        completions = s.generation(
            OpenAICompletionBody, completion_request, self._framing(chat=False), choice_count
        )
        return [
            Route("/v1/chat/completions", s.guarded(OPENAI_ERRORS, chat), methods=["POST"]),
            Route("/v1/completions", s.guarded(OPENAI_ERRORS, completions), methods=["POST"]),
            Route("/v1/models", s.guarded(OPENAI_ERRORS, self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", s.guarded(OPENAI_ERRORS, self.model), methods=["GET"]),
        ]

    def _object(self, name: str) -> dict[str, Any]:
        """OpenAI's model object, with Ollama's ``capabilities`` of the model added (as /api/show)
        once it is loaded."""
        out: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": self._server.created_s,
            "owned_by": "slotserve",
        }
        try:
            backend = self._server.runtime.backend
        except RuntimeClosedError:  # still loading
            return out
        out["capabilities"] = capabilities(backend.info.embedding_length, tools=calls_tools(backend))
        return out

    async def models(self, request: Request) -> Response:
        """GET /v1/models: the one model this server serves, under its primary name."""
        body = {"object": "list", "data": [self._object(self._server.names.primary)]}
        return Response(_encode(body), media_type="application/json")

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{id}: the model object for any name the model answers to, with the
        name as asked for as its id (as Ollama answers it).

        :raises HTTPException: 404 for any other name.
        """
        name: str = request.path_params["model"]
        self._server.names.check(name)
        return Response(_encode(self._object(name)), media_type="application/json")
