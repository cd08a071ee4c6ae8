"""A request's way from the caller to a slot and back: the Ticket and the ResponseStream.

The Ticket travels through the mailbox; the slot that takes it streams Chunks back on the
ticket's reply stream. The caller holds the ResponseStream: reading it yields the chunks,
closing it (or cancelling the task that reads it) cancels the request at the next step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

import anyio

from runtime.channel import ChannelReceiver, ChannelSender
from runtime.errors import GenerationError
from runtime.messages import ChatRequest, Chunk, Completion, GenerateRequest

__all__ = ["ResponseStream", "Ticket"]

Reply = Chunk | BaseException


@dataclass(eq=False)
class Ticket:
    """One admitted request: what was asked, where to answer, and whether it was cancelled."""

    request: GenerateRequest | ChatRequest
    reply: ChannelSender[Reply]
    admitted_ns: int = field(default_factory=time.perf_counter_ns)
    cancelled: bool = False
    sent: int = 0
    """Chunks sent to the caller so far (a request that sent none can be retried)."""
    crashes: int = 0
    """Slot crashes this request was part of."""
    on_cancel: Callable[[], None] | None = None
    """Set by the slot that serves the ticket; called once on cancel."""

    def finish(self, last: Reply | None) -> None:
        """Send the last reply (final chunk or error) if the caller still listens, then close."""
        if last is None:
            self.reply.close()
            return
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.reply.send_last(last)  # past the stream's capacity: the last word is never lost

    def cancel(self) -> None:
        """Cancel the request (idempotent; event-loop thread only)."""
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel()


class ResponseStream:
    """The caller's end of one request: an async iterator of :class:`Chunk`.

    Use it with ``async with`` (or call ``aclose``) so that leaving early cancels the request;
    cancelling the reading task cancels it too. Iteration raises the request's error, if any
    (:class:`~runtime.errors.SlotFailedError`, :class:`~runtime.errors.ContextOverflowError`).
    """

    def __init__(
        self,
        ticket: Ticket,
        receive: ChannelReceiver[Reply],
        admit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._ticket = ticket
        self._receive = receive
        self._admit = admit
        self._done = False
        self._thread = threading.get_ident()

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._admit is not None:
                admit, self._admit = self._admit, None
                await admit()
            item = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._finish()  # ended, or closed by another task while this one waited
            raise StopAsyncIteration from None
        except BaseException:
            self._finish()
            raise
        if isinstance(item, BaseException):
            self._finish()
            raise item
        if item.done:
            self._finish()
        return item

    async def collect(self) -> Completion:
        """Read the whole answer.

        :raises GenerationError: if the request failed after admission, or the stream was
            closed (the request cancelled) before it finished.
        :raises ContextOverflowError: if the prompt and max_tokens do not fit the slot.
        """
        texts: list[str] = []
        tokens: list[int] = []
        async with self:
            async for chunk in self:
                texts.append(chunk.text)
                tokens.extend(chunk.token_ids)
                if chunk.done:
                    assert chunk.done_reason is not None and chunk.stats is not None
                    return Completion(
                        text="".join(texts),
                        token_ids=tuple(tokens),
                        done_reason=chunk.done_reason,
                        stats=chunk.stats,
                    )
        raise GenerationError("the response stream was closed before the request finished (cancelled)")

    def _finish(self) -> None:
        self._done = True
        self._ticket.cancel()
        self._receive.close()

    async def aclose(self) -> None:
        """Stop reading; an unfinished request is cancelled at the next step."""
        self._finish()

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._finish()

    def __del__(self) -> None:
        if not self._done and threading.get_ident() == self._thread:
            self._finish()
