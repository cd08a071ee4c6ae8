"""RequestSink: a slot's per-token work, which the step loop runs for every busy slot in turn.

Each generated token becomes text (whole UTF-8 characters, stop strings held back) and goes to
the caller's reply stream as a chunk. The step loop hands a step's tokens to the sinks while
the next step decodes, so this work overlaps the decode and costs no task switch: the slot's
own task wakes only when the request ends or when its caller falls behind (the reply stream is
full). Then the sink is *blocked*: the step loop skips its sequence, text gathers in the sink,
and the slot's task waits for room and sends it. A slow caller pauses only its own request.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from actors.scheduler import Finish
from runtime.core.channel import ChannelSender
from runtime.core.events import Observers
from runtime.core.messages import Chunk, DoneReason, TokenLogprob
from runtime.core.streaming import TextStream
from runtime.core.ticket import Reply

__all__ = ["RequestSink"]


class RequestSink:
    """One request's generated tokens, turned into chunks on its ``reply`` channel.

    Its ``reason`` says why the *sequence* ended; the slot then finishes the request
    (:meth:`runtime.core.ticket.Ticket.finish`) with it.

    :param pieces: each token id's bytes (the backend's ``pieces``).
    :param index: the choice this request is of its request's n (``Chunk.index``).
    """

    def __init__(
        self,
        reply: ChannelSender[Reply],
        stops: tuple[str, ...],
        pieces: Sequence[bytes],
        observers: Observers,
        index: int = 0,
    ) -> None:
        self._reply = reply
        self.index = index
        self._text = TextStream(stops)
        self._pieces = pieces
        self._observers = observers
        self._wake = anyio.Event()
        self.out = ""
        """Text not sent yet."""
        self.pending: list[int] = []
        """Token ids not sent yet."""
        self.pending_logprobs: list[TokenLogprob] = []
        """Their log-probabilities, where the request asked for them."""
        self.taken = 0
        self.generated: list[int] = []
        """Every token this request got, in order."""
        """Tokens this request got (the step loop may have sampled more before it heard of an end)."""
        self.first_ns: int | None = None
        """When the step that made the first token ended (``time.perf_counter_ns``)."""
        self.last_ns = 0
        self.reason: DoneReason | None = None
        """Set once: why the request ended."""
        self.error: BaseException | None = None
        """With reason ``error``: what failed it."""
        self.blocked = False
        """The reply stream is full: the step loop skips this sequence until the slot sent."""
        self._unblocking: anyio.CancelScope | None = None
        self.wake_on_token = False
        """Wake the slot's task at the next token (a preemption waits for the first one)."""

    # -- called by the step loop -------------------------------------------------------------

    def take(self, token: int, finish: Finish, at_ns: int, logprob: TokenLogprob | None = None) -> bool:
        """One generated token; ``finish`` is ``stop`` (end of generation), ``length`` or None;
        ``logprob`` where the request asked for log-probabilities.

        :returns: whether the sequence goes on (False: a stop string, the end, or the request
            was ended meanwhile).
        """
        if self.reason is not None:
            return False
        if self.first_ns is None:
            self.first_ns = at_ns
            if self.wake_on_token:
                self.wake_on_token = False
                self._wake.set()
        else:
            self._observers.inter_token((at_ns - self.last_ns) / 1e9)
        self.last_ns = at_ns
        self.taken += 1
        self.generated.append(token)
        self.pending.append(token)
        if finish != "stop":  # an end-of-generation token has no text (nor a log-probability)
            self.out += self._text.push(self._pieces[token])
            if logprob is not None:
                self.pending_logprobs.append(logprob)
        if self._text.stopped:
            self.end("stop")
        elif finish is not None:
            self.end(finish)
        else:
            self.flush()
        return self.reason is None

    def fail(self, error: BaseException) -> None:
        """End the request with ``error`` (the step failed, or this sequence's row did)."""
        if self.reason is None:
            self.error = error
            self.end("error")

    # -- called by the slot ------------------------------------------------------------------

    def end(self, reason: DoneReason) -> None:
        """End the request (once; later calls change nothing) and wake the slot's task."""
        if self.reason is None:
            self.reason = reason
            self._wake.set()
            if self._unblocking is not None and reason in ("cancel", "error"):
                self._unblocking.cancel()  # nobody needs the text: stop waiting for room

    def flush(self) -> None:
        """Send the gathered text as one chunk if the reply stream has room; else block."""
        if self.blocked or not self.out:
            return
        try:
            self._reply.send_nowait(self._chunk())
        except anyio.WouldBlock:
            self.blocked = True
            self._wake.set()
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.end("cancel")  # the caller closed its stream
            return
        self.out, self.pending, self.pending_logprobs = "", [], []

    def _chunk(self) -> Chunk:
        if self.pending_logprobs:
            return Chunk(
                text=self.out, token_ids=tuple(self.pending), logprobs=tuple(self.pending_logprobs),
                index=self.index,
            )  # fmt: skip
        return Chunk(text=self.out, token_ids=tuple(self.pending), index=self.index)

    def nudge(self) -> None:
        """Wake the slot's task (a preemption was asked of it), also from a wait for room: a
        caller who does not read must not keep the slot."""
        self._wake.set()
        if self._unblocking is not None:
            self._unblocking.cancel()  # nothing was sent; the sink stays blocked

    async def wait(self) -> None:
        """Until the request ended or the sink blocked."""
        await self._wake.wait()
        self._wake = anyio.Event()

    async def unblock(self) -> None:
        """Wait for room in the reply stream and send what gathered (the slot's task does this
        when the sink blocked); the sequence then goes on. A closed stream ends the request, and
        an end meanwhile (a cancel) stops the wait."""
        chunk = self._chunk()
        with anyio.CancelScope() as self._unblocking:
            try:
                await self._reply.send(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.end("cancel")
            else:  # sent; what came meanwhile (steps already in flight) waits for the next chunk
                self.out = self.out[len(chunk.text) :]
                self.pending = self.pending[len(chunk.token_ids) :]
                self.pending_logprobs = self.pending_logprobs[len(chunk.logprobs or ()) :]
            finally:
                self._unblocking = None
        if self.reason is not None:
            return  # ended while it waited: the slot sends the rest in the final chunk
        self.blocked = False
        self.flush()  # what came while the send waited

    def finish_text(self) -> str:
        """End of generation: the text still held back (a partial character, a stop prefix)."""
        return self._text.finish()
