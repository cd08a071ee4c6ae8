"""A request's n choices (OpenAI's ``n``): the tickets' rendezvous, and the caller's one stream.

The n tickets of one request go into the mailbox together; each slot that takes one joins the
request's :class:`ChoiceGroup`. When all n have joined (or :data:`GATHER_TIMEOUT_S` after the
first did), their sequences begin together, the first one's first: it evaluates the prompt
once, and the others get copies of its KV cells and sample their first tokens from its last
prompt row (actors.scheduler). A choice that joins later, or a backend that cannot copy cells,
evaluates the prompt by itself: the answer is the same, only dearer.

:class:`ChoiceStream` reads the n reply streams as one: the chunks of every choice as they come,
each with its ``index``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runtime.core.errors import GenerationError
from runtime.core.messages import ChatRequest, Chunk, Completion, CompletionBuilder, GenerateRequest

__all__ = ["GATHER_TIMEOUT_S", "MAX_CHOICES", "ChoiceGroup", "ChoiceSource", "ChoiceStream"]

J = TypeVar("J")
MAX_CHOICES = 128
"""OpenAI's limit of ``n``; the slots bound it further (each choice takes one)."""
GATHER_TIMEOUT_S = 2.0
"""How long the first choice waits for the others to reach a slot before it starts without them
(they are in the mailbox behind nothing else, so with free slots they come within microseconds;
this bounds the wait when slots went away meanwhile)."""


class ChoiceGroup(Generic[J]):
    """The slots' rendezvous for the ``n`` choices of one request (event loop only): ``jobs`` in
    the order they joined; the first is the one whose prompt the others share."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.jobs: list[J] = []
        self.started = False
        self._all_in = anyio.Event()

    @property
    def leader(self) -> J:
        """The first job that joined."""
        return self.jobs[0]

    async def join(self, job: J, begin: Callable[[J], None]) -> None:
        """Add ``job``; start the group (``begin`` each job, the leader's first) once all ``n``
        have joined, or ``GATHER_TIMEOUT_S`` after the first joined; a job that joins after
        that is begun at once."""
        self.jobs.append(job)
        if self.started:
            begin(job)
        elif len(self.jobs) == self.n:
            self._start(begin)
        elif len(self.jobs) == 1:
            with anyio.move_on_after(GATHER_TIMEOUT_S):
                await self._all_in.wait()
            if not self.started:
                self._start(begin)

    def _start(self, begin: Callable[[J], None]) -> None:
        self.started = True
        self._all_in.set()
        for job in self.jobs:
            begin(job)


class ChoiceSource(Protocol):
    """One choice's chunks, as a ChoiceStream reads them: a ResponseStream, or a replica's
    stream over Ray Serve (runtime.ray_serve.stream)."""

    @property
    def request(self) -> GenerateRequest | ChatRequest: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def __aiter__(self) -> Self: ...

    async def __anext__(self) -> Chunk: ...

    async def aclose(self) -> None: ...


class ChoiceStream:
    """The caller's end of a request's n choices: an async iterator of :class:`Chunk` whose
    ``index`` says which choice each is; it ends after every choice's last chunk. Use it with
    ``async with`` (that runs one reader per choice); leaving early cancels every choice.
    Iteration raises the first error of any choice (and cancels the others).
    """

    def __init__(self, streams: Sequence[ChoiceSource]) -> None:
        self.streams = streams
        self._send: MemoryObjectSendStream[Chunk | BaseException] | None = None
        self._receive: MemoryObjectReceiveStream[Chunk | BaseException] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._left = len(streams)
        self._held: BaseException | None = None

    @property
    def finished(self) -> bool:
        """Whether every choice's last chunk has been read."""
        return self._left == 0

    async def __aenter__(self) -> ChoiceStream:
        self._send, self._receive = anyio.create_memory_object_stream[Chunk | BaseException](math.inf)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for stream in self.streams:
            self._tg.start_soon(self._pump, stream)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for stream in self.streams:
            await stream.aclose()
        assert self._tg is not None and self._send is not None and self._receive is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._send.close()
        self._receive.close()

    async def _pump(self, stream: ChoiceSource) -> None:
        assert self._send is not None
        try:
            async with stream:
                async for chunk in stream:
                    if chunk.queue is None:  # the choices' stream has no queue events
                        self._send.send_nowait(chunk)
        except Exception as exc:  # handed to the reader, which raises it
            self._send.send_nowait(exc)

    def __aiter__(self) -> ChoiceStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._receive is None:
            raise RuntimeError("read a ChoiceStream inside its `async with`")
        if self.finished:
            raise StopAsyncIteration
        item = self._held if self._held is not None else await self._receive.receive()
        self._held = None
        return self._accept(item)

    def available(self) -> list[Chunk]:
        """The chunks that have arrived, without waiting (an HTTP reply writes them in one frame).

        :raises BaseException: as iteration, if a choice failed.
        """
        chunks: list[Chunk] = []
        assert self._receive is not None
        while not self.finished and self._held is None:
            try:
                item = self._receive.receive_nowait()
            except anyio.WouldBlock:
                break
            if isinstance(item, BaseException) and chunks:
                self._held = item
                break
            chunks.append(self._accept(item))
        return chunks

    def _accept(self, item: Chunk | BaseException) -> Chunk:
        if isinstance(item, BaseException):
            raise item
        if item.done:
            self._left -= 1
        return item

    async def collect(self) -> list[Completion]:
        """Read every choice whole; the completions in index order.

        :raises GenerationError: if a choice failed after admission.
        :raises ContextOverflowError: if the prompt and max_tokens do not fit the slot.
        """
        answers = [CompletionBuilder.for_request(s.request) for s in self.streams]
        done: list[Completion | None] = [None] * len(self.streams)
        async with self:
            async for chunk in self:
                done[chunk.index] = answers[chunk.index].add(chunk)
        if any(c is None for c in done):
            raise GenerationError("the response stream ended before every choice finished")
        return [c for c in done if c is not None]
