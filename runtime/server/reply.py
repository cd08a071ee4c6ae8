"""Serving one ResponseStream over HTTP, streamed or whole, for any API's framing.

A request's n choices (a ChoiceStream) are served the same way: their chunks interleave as they
come, each framed with its index, and the stream ends after the last choice's last chunk; a
whole answer holds every choice (the framing's ``whole_choices``).

The first chunk is awaited before the status line is sent, so errors the runtime reports on the
first read (ContextOverflowError, a refused admission) still get their 4xx or 503. After that an
error is sent in-band, in the API's own framing, and the stream ends cleanly.

While the reply waits (in the mailbox, during a long prefill, between chunks) a watcher task
listens for ``http.disconnect``; a client that goes away closes the ResponseStream, which
cancels the request at the slot's next step boundary. The handler only reads the stream: the
slot and its sequence belong to the SlotActor.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from runtime.core.choices import ChoiceStream
from runtime.core.errors import GenerationError, RuntimeClosedError
from runtime.core.messages import Chunk, Completion, CompletionBuilder
from runtime.server.errors import HttpError, http_error
from runtime.server.served import ChunkStream

__all__ = ["Framing", "ReplyResponse", "error_response"]

log = logging.getLogger("slotserve.server")


class Framing(Protocol):
    """How one API writes answers and errors (Ollama NDJSON, OpenAI SSE)."""

    stream_media_type: str
    """Content-Type of a streamed answer."""

    def piece(self, chunk: Chunk) -> bytes:
        """A streamed frame carrying ``chunk.text`` (not the answer's last chunk; with n choices,
        it may be the last of one of them)."""

    def last(self, chunk: Chunk) -> bytes:
        """The closing frames: the last chunk's text if any, why it ended, the counts."""

    def whole(self, completion: Completion) -> bytes:
        """The JSON body of an answer that is not streamed."""

    def error(self, error: HttpError) -> bytes:
        """The JSON body of an error response."""

    def error_frame(self, error: HttpError) -> bytes:
        """An error sent in-band once streaming has started, then the end of the stream."""


@runtime_checkable
class ChoicesFraming(Framing, Protocol):
    """A framing that writes a request's n choices in one answer (OpenAI's)."""

    def whole_choices(self, completions: list[Completion]) -> bytes:
        """The JSON body of an answer of several choices, not streamed."""


def error_response(exc: BaseException, framing: Framing, retry_after_s: int) -> Response:
    """A complete error response for ``exc`` in ``framing``'s error format."""
    error = http_error(exc, retry_after_s)
    return Response(framing.error(error), error.status, headers=error.headers, media_type="application/json")


class ReplyResponse:
    """An ASGI response serving ``stream``; ``streaming`` selects frames or one JSON body."""

    def __init__(
        self, stream: ChunkStream | ChoiceStream, framing: Framing, *, streaming: bool, retry_after_s: int
    ) -> None:
        self._stream = stream
        self._framing = framing
        self._streaming = streaming
        self._retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._stream, anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            await self._reply(scope, receive, send)
            tg.cancel_scope.cancel()

    async def _reply(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            chunk = await _next(self._stream)
            if not self._streaming:
                if isinstance(self._stream, ChoiceStream):
                    assert isinstance(self._framing, ChoicesFraming)
                    body = self._framing.whole_choices(await _all(self._stream, chunk))
                else:
                    body = self._framing.whole(await _rest(self._stream, chunk))
        except Exception as exc:
            await error_response(exc, self._framing, self._retry_after_s)(scope, receive, send)
            return
        if not self._streaming:
            await Response(body, media_type="application/json")(scope, receive, send)
            return
        headers = [
            (b"content-type", self._framing.stream_media_type.encode()),
            (b"cache-control", b"no-cache"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        piece, unsent = self._framing.piece, [chunk]
        try:
            while not self._last(unsent[-1]):  # what came meanwhile goes in one write
                body = b"".join(map(piece, unsent))
                await send({"type": "http.response.body", "body": body, "more_body": True})
                unsent = []
                unsent.append(await _next(self._stream))
                _take_ready(self._stream, unsent)
            frame = b"".join(map(piece, unsent[:-1])) + self._framing.last(unsent[-1])
        except Exception as exc:  # the text that came before the error goes out first
            text = b"".join(map(piece, unsent))
            frame = text + self._framing.error_frame(http_error(exc, self._retry_after_s))
        await send({"type": "http.response.body", "body": frame, "more_body": False})

    def _last(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` ends the answer (with n choices: the last choice's last chunk)."""
        stream = self._stream
        return chunk.done and (not isinstance(stream, ChoiceStream) or stream.finished)


async def _next(stream: ChunkStream | ChoiceStream) -> Chunk:
    """The next chunk; a cancelled request (the runtime is closing) becomes an error."""
    while True:
        try:
            chunk = await stream.__anext__()
        except StopAsyncIteration:
            raise GenerationError("the reply ended without a final chunk") from None
        if chunk.queue is None:  # a queue event has no text: HTTP has nothing to say of it
            return _checked(chunk)


def _take_ready(stream: ChunkStream | ChoiceStream, into: list[Chunk]) -> None:
    """Append the chunks that have arrived to ``into``, one by one: an error or a cancel after
    some of them raises with those already in ``into``."""
    for chunk in stream.available():
        if chunk.queue is None:
            into.append(_checked(chunk))


def _checked(chunk: Chunk) -> Chunk:
    if chunk.done and chunk.done_reason == "cancel":
        raise RuntimeClosedError("the request was cancelled: the runtime is shutting down")
    return chunk


async def _all(stream: ChoiceStream, first: Chunk) -> list[Completion]:
    """Read the rest of every choice after ``first``; the completions in index order."""
    answers = [CompletionBuilder.for_request(s.request) for s in stream.streams]
    done: list[Completion | None] = [None] * len(answers)
    chunk = first
    while True:
        done[chunk.index] = answers[chunk.index].add(chunk)
        if stream.finished:
            break
        chunk = await _next(stream)
    return [c for c in done if c is not None]


async def _rest(stream: ChunkStream, first: Chunk) -> Completion:
    """Read the rest of the answer after ``first``."""
    answer, chunk = CompletionBuilder.for_request(stream.request), first
    while (completion := answer.add(chunk)) is None:
        chunk = await _next(stream)
    return completion


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` when the client disconnects (the request body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            log.debug("client disconnected; cancelling its request")
            scope.cancel()
            return
