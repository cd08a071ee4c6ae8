"""A bounded channel between two tasks of one event loop: the callers' reply streams, which
carry a chunk per step each.

anyio's memory object streams, used there before, take a checkpoint (a pass through the event
loop) before every send and receive, and make an Event and a receiver record for every wait:
with a token a step, each item cost two extra passes and about 20 us here, most of the runtime's
cost per token. A Channel has one receiving task and one sending task at a time; an item that
is there is taken at once, a send with room returns at once, and a task with nothing to do
waits on one future that the other side completes. Waiting is a checkpoint (cancellable);
taking an item that is there is not, which bounds a reader's run without yielding by the
capacity.

The exceptions and their meanings are anyio's (``WouldBlock``, ``EndOfStream``,
``ClosedResourceError``, ``BrokenResourceError``, ``BusyResourceError``), so the code on
either side reads as with memory object streams. The runtime runs on asyncio (uvloop too).
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio

__all__ = ["ChannelReceiver", "ChannelSender", "channel"]

T = TypeVar("T")


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _State(Generic[T]):
    __slots__ = (
        "buffer", "capacity", "loop", "receive_waiter", "receiver_closed", "send_waiter", "sender_closed",
        "sent",
    )  # fmt: skip

    def __init__(self, capacity: int) -> None:
        self.buffer: deque[T] = deque()
        self.capacity = capacity
        self.loop = asyncio.get_running_loop()
        self.receive_waiter: asyncio.Future[None] | None = None
        self.send_waiter: asyncio.Future[None] | None = None
        self.sender_closed = False
        self.receiver_closed = False
        self.sent = 0

    def wake_receiver(self) -> None:
        if (w := self.receive_waiter) is not None:
            self.receive_waiter = None
            _wake(w)

    def wake_sender(self) -> None:
        if (w := self.send_waiter) is not None:
            self.send_waiter = None
            _wake(w)


class _End(Generic[T]):
    """What both ends have: the shared state, and ``with`` (which closes the end)."""

    __slots__ = ("_state",)

    def __init__(self, state: _State[T]) -> None:
        self._state = state

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ChannelSender(_End[T]):
    """The sending end; ``with`` closes it."""

    __slots__ = ()

    @property
    def sent(self) -> int:
        """Items sent so far (taken by the receiver or not)."""
        return self._state.sent

    def send_nowait(self, item: T) -> None:
        """Send ``item`` now.

        :raises anyio.WouldBlock: if the buffer is full.
        :raises anyio.BrokenResourceError: if the receiving end is closed.
        :raises anyio.ClosedResourceError: if this end is closed.
        """
        s = self._state
        if s.sender_closed:
            raise anyio.ClosedResourceError
        if s.receiver_closed:
            raise anyio.BrokenResourceError
        if len(s.buffer) >= s.capacity:
            raise anyio.WouldBlock
        s.buffer.append(item)
        s.sent += 1
        s.wake_receiver()

    def send_last(self, item: T) -> None:
        """Send ``item`` even past the capacity, then close this end: a stream's last word
        (a final chunk, an error) is never lost to a full buffer.

        :raises anyio.BrokenResourceError: if the receiving end is closed (this end closes).
        :raises anyio.ClosedResourceError: if this end is closed.
        """
        s = self._state
        if s.sender_closed:
            raise anyio.ClosedResourceError
        try:
            if s.receiver_closed:
                raise anyio.BrokenResourceError
            s.buffer.append(item)
            s.sent += 1
        finally:
            self.close()

    async def send(self, item: T) -> None:
        """Send ``item``, waiting for room if the buffer is full.

        :raises anyio.BrokenResourceError: if the receiving end is or gets closed.
        :raises anyio.ClosedResourceError: if this end is closed.
        :raises anyio.BusyResourceError: if another task waits to send already.
        """
        s = self._state
        while True:
            try:
                self.send_nowait(item)
            except anyio.WouldBlock:
                pass
            else:
                return
            if s.send_waiter is not None:
                raise anyio.BusyResourceError("sending")
            waiter = s.send_waiter = s.loop.create_future()
            try:
                await waiter
            finally:
                if s.send_waiter is waiter:
                    s.send_waiter = None

    def close(self) -> None:
        """Close this end: the receiver takes what is buffered, then gets EndOfStream."""
        self._state.sender_closed = True
        self._state.wake_receiver()
        self._state.wake_sender()


class ChannelReceiver(_End[T]):
    """The receiving end; ``with`` closes it."""

    __slots__ = ()

    def receive_nowait(self) -> T:
        """Take the next item now.

        :raises anyio.WouldBlock: if there is none yet.
        :raises anyio.EndOfStream: if there is none and the sending end is closed.
        :raises anyio.ClosedResourceError: if this end is closed.
        """
        s = self._state
        if s.receiver_closed:
            raise anyio.ClosedResourceError
        if s.buffer:
            item = s.buffer.popleft()
            s.wake_sender()
            return item
        if s.sender_closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> T:
        """Take the next item, waiting for one if there is none yet.

        :raises anyio.EndOfStream: once the sending end is closed and every item was taken.
        :raises anyio.ClosedResourceError: if this end is or gets closed.
        :raises anyio.BusyResourceError: if another task waits to receive already.
        """
        s = self._state
        while True:
            if s.buffer and not s.receiver_closed:  # the usual case, without an exception
                item = s.buffer.popleft()
                s.wake_sender()
                return item
            if s.receiver_closed or s.sender_closed:
                return self.receive_nowait()  # raises the error that says which end closed
            if s.receive_waiter is not None:
                raise anyio.BusyResourceError("receiving")
            waiter = s.receive_waiter = s.loop.create_future()
            try:
                await waiter
            finally:
                if s.receive_waiter is waiter:
                    s.receive_waiter = None

    def close(self) -> None:
        """Close this end: a waiting receive gets ClosedResourceError, sends BrokenResourceError."""
        self._state.receiver_closed = True
        self._state.buffer.clear()
        self._state.wake_receiver()
        self._state.wake_sender()


def channel(capacity: int) -> tuple[ChannelSender[Any], ChannelReceiver[Any]]:
    """A new channel holding up to ``capacity`` items (at least 1): its (sender, receiver),
    for tasks of the running asyncio event loop.

    :raises ValueError: if ``capacity`` is below 1.
    :raises RuntimeError: if no asyncio event loop runs in this thread.
    """
    if capacity < 1:
        raise ValueError(f"capacity is {capacity}; a channel holds at least 1 item")
    state: _State[Any] = _State(capacity)
    return ChannelSender(state), ChannelReceiver(state)
