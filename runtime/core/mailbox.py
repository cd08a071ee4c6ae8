"""The bounded mailbox: admitted requests wait here until an idle slot pulls one.

Built on an anyio memory object stream. Each SlotActor holds a receive clone and asks for
work only when idle (work-pulling; no dispatcher). ``max_queue`` bounds the requests that
wait; an idle slot takes a request straight from ``put_nowait`` without it ever waiting.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runtime.core.errors import QueueFullError
from runtime.core.records import MailboxStatistics

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Mailbox"]

T = TypeVar("T")


@dataclass(eq=False)
class Mailbox(Generic[T]):
    """A bounded queue of requests of type ``T``.

    :param capacity: requests that may wait for a slot (``max_queue``).
    """

    capacity: int
    _send: MemoryObjectSendStream[T] = field(init=False)
    _receive: MemoryObjectReceiveStream[T] = field(init=False)
    _admitted: int = 0
    _rejected: int = 0
    _closed_error: Callable[[], Exception] | None = None

    def __post_init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[T](self.capacity)

    def put_nowait(self, item: T) -> None:
        """Admit ``item`` at once.

        :raises QueueFullError: if ``capacity`` items wait already.
        :raises RuntimeClosedError: if the mailbox is closed.
        """
        self._check_open()
        try:
            self._send.send_nowait(item)
        except anyio.WouldBlock:
            self._rejected += 1
            raise QueueFullError(self.capacity) from None
        self._admitted += 1

    def put_all_nowait(self, items: list[T]) -> None:
        """Admit every one of ``items`` at once, or none of them.

        :raises QueueFullError: if there is not room for all (idle slots and free places).
        :raises RuntimeClosedError: if the mailbox is closed.
        """
        self._check_open()
        stats = self._send.statistics()
        room = stats.max_buffer_size - stats.current_buffer_used + stats.tasks_waiting_receive
        if room < len(items):
            self._rejected += len(items)
            raise QueueFullError(self.capacity)
        for item in items:
            self.put_nowait(item)

    async def put(self, item: T, timeout_s: float) -> None:
        """Admit ``item``, waiting up to ``timeout_s`` seconds for room.

        :raises QueueFullError: if there was no room within ``timeout_s``.
        :raises RuntimeClosedError: if the mailbox is or gets closed.
        """
        self._check_open()
        start = time.monotonic()
        try:
            with anyio.fail_after(timeout_s if math.isfinite(timeout_s) else None):
                await self._send.send(item)
        except TimeoutError:
            self._rejected += 1
            raise QueueFullError(self.capacity, time.monotonic() - start) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._check_open()
            raise
        self._admitted += 1

    def receiver(self) -> MemoryObjectReceiveStream[T]:
        """A receive clone for one slot; close it when the slot stops."""
        return self._receive.clone()

    def close(self, error: Callable[[], Exception]) -> list[T]:
        """Refuse new items with ``error()`` and return the items that were still waiting."""
        self._closed_error = error
        left: list[T] = []
        while True:
            try:
                left.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        self._send.close()
        self._receive.close()  # the slots' clones stay open until they have seen the end
        return left

    def _check_open(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error()

    def statistics(self) -> MailboxStatistics:
        """A snapshot of depth, capacity and admission counts."""
        return MailboxStatistics(
            depth=self._send.statistics().current_buffer_used,
            capacity=self.capacity,
            admitted=self._admitted,
            rejected=self._rejected,
            closed=self._closed_error is not None,
        )
