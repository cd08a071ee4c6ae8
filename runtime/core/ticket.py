"""A request's way from the caller to a slot and back: the Ticket and the ResponseStream.

The Ticket travels through the mailbox; the slot that takes it streams Chunks back on the
ticket's reply channel. The caller holds the ResponseStream: reading it yields the chunks,
closing it (or cancelling the task that reads it) cancels the request at the next step.

A request ends in exactly one place, :meth:`Ticket.finish`, with its DoneReason: the last reply
goes to the caller and the runtime is told once, whoever ends it (the slot that served it, the
Supervisor when that slot crashed, the Runtime when it closes or fails).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from runtime.core.channel import ChannelReceiver, ChannelSender
from runtime.core.errors import GenerationError
from runtime.core.messages import (
    ChatRequest,
    Chunk,
    Completion,
    CompletionBuilder,
    DoneReason,
    GenerateRequest,
    QueueEstimate,
    RequestStats,
)

if TYPE_CHECKING:
    from runtime.core.choices import ChoiceGroup

__all__ = ["OnFinish", "Preemptible", "Reply", "ResponseStream", "Ticket"]

Reply = Chunk | BaseException
OnFinish = Callable[["Ticket", DoneReason, RequestStats | None, BaseException | None], None]
"""(ticket, done_reason, stats or None if it never ran, the error if it failed)."""


class Preemptible(Protocol):
    """A request being served that can be asked to give its slot way (actors.preemption)."""

    @property
    def asked(self) -> bool:
        """A preemption was asked and the slot has not answered yet."""
        ...

    def ask(self, *, give_way: bool = False, for_priority: int | None = None) -> bool:
        """Ask the slot to park the request, once it has its first token: for a waiting one of
        ``for_priority`` (the ask lapses if none of that priority or above waits by then), or
        by hand (None). ``give_way``: it goes back behind the requests waiting in its class,
        else first of them. False if it was asked already or has ended."""
        ...

    async def decided(self) -> bool:
        """Wait for the slot's answer: whether the request was parked."""
        ...


@dataclass(eq=False)
class Ticket:
    """One admitted request: what was asked, where to answer, and who is told when it ends.

    Its state changes only through its methods; ``crashes`` is the Supervisor's count.
    """

    request: GenerateRequest | ChatRequest
    reply: ChannelSender[Reply]
    on_finish: OnFinish
    """Called once, by :meth:`finish` (the Runtime's bookkeeping and observers)."""
    admitted_ns: int = field(default_factory=time.perf_counter_ns)
    crashes: int = 0
    """Slot crashes this request was part of (written by the Supervisor only)."""
    group: ChoiceGroup[Any] | None = None
    """The request's choices, where it asked for more than one (runtime.core.choices)."""
    index: int = 0
    """Which of them this ticket is."""
    serving: Preemptible | None = None
    """Set by the slot serving it while it can be preempted (None: it cannot now)."""
    parked: Any = None
    """A preempted request's saved run (actors.preemption.Parked) while it waits to resume."""
    _cancelled: bool = False
    _finished: bool = False
    _on_cancel: Callable[[], None] | None = None

    @property
    def cancelled(self) -> bool:
        """Whether the caller cancelled the request (closed its stream, or the runtime closed)."""
        return self._cancelled

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` was called."""
        return self._finished

    @property
    def sent(self) -> int:
        """Chunks sent to the caller so far (a request that sent none can be retried)."""
        return self.reply.sent

    def listen(self, on_cancel: Callable[[], None] | None) -> None:
        """Have ``on_cancel`` called on a cancel from now on (None: nobody listens). While the
        ticket waits, the admission listens (a cancel takes it out of the queue); then the slot
        serving it; a late cancel never reaches the slot's next request."""
        self._on_cancel = None if self._finished else on_cancel

    def cancel(self) -> None:
        """Cancel the request (idempotent; event-loop thread only)."""
        if not self._cancelled and not self._finished:
            self._cancelled = True
            if self._on_cancel is not None:
                self._on_cancel()

    def finish(
        self,
        reason: DoneReason,
        *,
        final: Chunk | None = None,
        stats: RequestStats | None = None,
        error: BaseException | None = None,
    ) -> bool:
        """End the request: stop its sequence if a slot listens, send its last reply (``error``
        if given, else ``final``) if the caller still listens, close the stream, and tell
        ``on_finish``. The first call does this; later calls change nothing.

        :returns: whether this call ended the request.
        """
        if self._finished:
            return False
        self._finished = True
        listener, self._on_cancel = self._on_cancel, None
        if listener is not None and not self._cancelled:
            listener()  # ended by someone else than its slot (the runtime failed): stop the sequence
        last = error if error is not None else final
        if last is None:
            self.reply.close()
        else:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.reply.send_last(last)  # past the stream's capacity: the last word is never lost
        self.on_finish(self, reason, stats, error)
        return True


class ResponseStream:
    """The caller's end of one request: an async iterator of :class:`Chunk`.

    Use it with ``async with`` (or call ``aclose``) so that leaving early cancels the request;
    cancelling the reading task cancels it too. Iteration raises the request's error, if any
    (:class:`~runtime.core.errors.SlotFailedError`, :class:`~runtime.core.errors.ContextOverflowError`).
    """

    def __init__(
        self,
        ticket: Ticket,
        receive: ChannelReceiver[Reply],
        admit: Callable[[], Awaitable[QueueEstimate]] | None = None,
        *,
        estimate: QueueEstimate | None = None,
        queue_event: bool = False,
    ) -> None:
        self._ticket = ticket
        self._receive = receive
        self._admit = admit
        self.estimate = estimate
        """Where the request stood in the queue at admission and its predicted start (None
        until a timed admission is done)."""
        self._queue_event = queue_event
        self._done = False
        self._held: BaseException | None = None
        self._thread = threading.get_ident()

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._admit is not None:
                admit, self._admit = self._admit, None
                self.estimate = await admit()
            if self._queue_event and self.estimate is not None:
                self._queue_event = False
                return Chunk(text="", token_ids=(), index=self._ticket.index, queue=self.estimate)
            item: Reply
            if self._held is not None:
                item, self._held = self._held, None
            else:
                item = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._close()  # ended, or closed by another task while this one waited
            raise StopAsyncIteration from None
        except BaseException:
            self._close()
            raise
        return self._accept(item)

    def available(self) -> list[Chunk]:
        """The chunks that have arrived, without waiting (none if the next one has not); the
        answer's last chunk ends the list. An HTTP reply writes them in one frame.

        :raises BaseException: as iteration, if the request failed.
        """
        chunks: list[Chunk] = []
        while not self._done and self._admit is None and self._held is None:
            try:
                item = self._receive.receive_nowait()
            except anyio.WouldBlock:
                break
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self._close()
                break
            if isinstance(item, BaseException) and chunks:
                self._held = item  # the chunks before it go out first; the next read raises it
                break
            chunks.append(self._accept(item))
        return chunks

    def _accept(self, item: Reply) -> Chunk:
        if isinstance(item, BaseException):
            self._close()
            raise item
        if item.done:
            self._close()
        return item

    async def collect(self) -> Completion:
        """Read the whole answer.

        :raises GenerationError: if the request failed after admission, or the stream was
            closed (the request cancelled) before it finished.
        :raises ContextOverflowError: if the prompt and max_tokens do not fit the slot.
        """
        answer = CompletionBuilder.for_request(self.request)
        async with self:
            async for chunk in self:
                if (completion := answer.add(chunk)) is not None:
                    return completion
        raise GenerationError("the response stream was closed before the request finished (cancelled)")

    @property
    def request(self) -> GenerateRequest | ChatRequest:
        """The request this stream answers."""
        return self._ticket.request

    def _close(self) -> None:
        self._done = True
        self._ticket.cancel()  # a no-op once the request has finished
        self._receive.close()

    async def aclose(self) -> None:
        """Stop reading; an unfinished request is cancelled at the next step."""
        self._close()

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def __del__(self) -> None:
        if not self._done and threading.get_ident() == self._thread:
            self._close()
