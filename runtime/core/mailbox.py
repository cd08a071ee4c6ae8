"""The bounded mailbox: admitted requests wait here until an idle slot pulls one.

Which request an idle slot gets is the scheduler queue's choice (runtime.core.fair_queue:
priority classes, weighted fair queuing between tenants, aging, per-tenant caps). Each
SlotActor holds a receiver and asks for work only when idle (work-pulling; no dispatcher).
``capacity`` (``max_queue``) bounds the requests that wait; an idle slot takes a request
straight from ``put_nowait`` without it ever waiting. Everything here runs on the event loop.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

import anyio

from runtime.core.errors import QueueFullError, TenantQueueFullError
from runtime.core.fair_queue import FairQueue, Held, Placement, QueuePolicy
from runtime.core.records import MailboxStatistics

__all__ = ["Mailbox", "MailboxReceiver"]

T = TypeVar("T")
_DEFAULT = Placement()
Check = Callable[[Sequence[T]], None]
"""Called with items just queued, before a slot may take them; raising refuses them."""


@dataclass(eq=False)
class _Waiter(Generic[T]):
    """One idle receiver's wait: set once an item is handed over, or the wait is ended."""

    event: anyio.Event = field(default_factory=anyio.Event)
    item: T | None = None
    handed: bool = False


class MailboxReceiver(Generic[T]):
    """One slot's end of the mailbox: :meth:`receive` the next request when idle."""

    def __init__(self, mailbox: Mailbox[T]) -> None:
        self._mailbox = mailbox
        self._waiter: _Waiter[T] | None = None
        self._closed = False

    async def receive(self) -> T:
        """The next request the queue gives out, waiting while there is none.

        :raises anyio.EndOfStream: if the mailbox is closed (nothing more will come).
        :raises anyio.ClosedResourceError: if this receiver is closed (the slot retires).
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        mb = self._mailbox
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if mb.closed and not mb.queue:  # (closed with items kept: they still go out)
                raise anyio.EndOfStream
            if not mb._waiters and (item := mb._take()) is not None:
                await anyio.lowlevel.cancel_shielded_checkpoint()
                return item
            waiter = self._waiter = _Waiter()
            mb._waiters.append(waiter)
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter.handed:  # cancelled with an item in hand: it goes back, first in its lane
                    mb._put_back(waiter.item)
                raise
            finally:
                self._waiter = None
                if waiter in mb._waiters:
                    mb._waiters.remove(waiter)
            if waiter.handed:
                return waiter.item  # type: ignore[return-value]  # handed: always an item

    def requeue(self, item: T, *, last: bool = False, refund: bool = True) -> bool:
        """Put ``item``, taken by this slot and paused (preempted), back in the queue as
        :meth:`Mailbox.requeue` does."""
        return self._mailbox.requeue(item, last=last, refund=refund)

    def remove(self, item: T) -> bool:
        """Take a waiting ``item`` out unserved (:meth:`Mailbox.remove`)."""
        return self._mailbox.remove(item)

    def waits_at_least(self, priority: int) -> bool:
        """Whether a request of ``priority`` or above waits (one a preemption is for)."""
        top = self._mailbox.queue.top_priority()
        return top is not None and top >= priority

    def close(self) -> None:
        """Take no more: an idle wait ends (ClosedResourceError), unless an item was already
        handed to it (then the wait returns it, and the slot serves it first)."""
        self._closed = True
        if self._waiter is not None and not self._waiter.handed:
            self._waiter.event.set()

    def __enter__(self) -> MailboxReceiver[T]:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Mailbox(Generic[T]):
    """A bounded scheduler queue of requests of type ``T``.

    :param capacity: requests that may wait for a slot (``max_queue``).
    :param policy: the queue's order and per-tenant caps (default: one class, one tenant,
        first come first served).
    :param on_take: called with (item, held record) when a slot takes an item.
    :param clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        capacity: int,
        policy: QueuePolicy | None = None,
        *,
        on_take: Callable[[T, Held[T]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.queue: FairQueue[T] = FairQueue(policy or QueuePolicy())
        """The order of the waiting items (read it; change it only through the mailbox)."""
        self._waiters: deque[_Waiter[T]] = deque()
        self._on_take = on_take
        self._clock = clock
        self._room = anyio.Event()
        self._admitted = 0
        self._rejected = 0
        self._closed_error: Callable[[], Exception] | None = None

    @property
    def closed(self) -> bool:
        """Whether the mailbox refuses new items."""
        return self._closed_error is not None

    def put_nowait(self, item: T, placement: Placement = _DEFAULT, *, check: Check[T] | None = None) -> None:
        """Admit ``item`` at once, where ``placement`` puts it in the queue.

        :raises QueueFullError: if ``capacity`` items wait already.
        :raises TenantQueueFullError: if ``tenant`` has ``tenant_max_queued`` items waiting.
        :raises RuntimeClosedError: if the mailbox is closed.
        """
        self.put_all_nowait([item], placement, check=check)

    def put_all_nowait(
        self,
        items: Sequence[T],
        placement: Placement = _DEFAULT,
        *,
        check: Check[T] | None = None,
    ) -> None:
        """Admit every one of ``items`` at once (a request's choices, served one after the
        other), or none of them. ``check`` is called once they are queued and before a slot
        may take them: what it raises refuses them (the queue is then as it was).

        :raises QueueFullError: if there is not room for all (idle slots and free places).
        :raises TenantQueueFullError: if ``tenant`` would have over ``tenant_max_queued`` waiting.
        :raises RuntimeClosedError: if the mailbox is closed.
        """
        self._check_open()
        if not self._has_room(len(items)):
            self._rejected += len(items)
            raise QueueFullError(self.capacity)
        try:
            self.queue.push(items, placement, now_s=self._clock())
        except TenantQueueFullError:
            self._rejected += len(items)
            raise
        if check is not None:
            try:
                check(items)
            except BaseException:
                self.queue.remove(items[0])
                self._rejected += len(items)
                raise
        self._dispatch()
        if len(self.queue) > self.capacity:  # idle slots there were, but a tenant cap held these back
            self.queue.remove(items[0])
            self._rejected += len(items)
            raise QueueFullError(self.capacity)
        self._admitted += len(items)

    async def put(
        self,
        item: T,
        timeout_s: float,
        placement: Placement = _DEFAULT,
        *,
        check: Check[T] | None = None,
    ) -> None:
        """Admit ``item``, waiting up to ``timeout_s`` seconds for room.

        :raises QueueFullError: if there was no room within ``timeout_s``.
        :raises TenantQueueFullError: at once, if ``tenant`` has ``tenant_max_queued`` waiting.
        :raises RuntimeClosedError: if the mailbox is or gets closed.
        """
        start = time.monotonic()
        try:
            with anyio.fail_after(timeout_s if math.isfinite(timeout_s) else None):
                while True:
                    room = self._room
                    if self._has_room(1):
                        self.put_nowait(item, placement, check=check)
                        return
                    await room.wait()  # not refused yet: it waits
        except TimeoutError:
            self._rejected += 1
            raise QueueFullError(self.capacity, time.monotonic() - start) from None

    def remove(self, item: T, *, refused: bool = False) -> bool:
        """Take ``item`` out unserved: cancelled while waiting, or (``refused``) refused after
        all, such as by its deadline (then counted as rejected, not admitted).

        :returns: whether it was waiting.
        """
        if not self.queue.remove(item):
            return False
        if refused:
            self._admitted -= 1
            self._rejected += 1
        self._freed()
        self._end_idle_waits()  # closed, and that was the last one kept
        return True

    def requeue(self, item: T, *, last: bool = False, refund: bool = True) -> bool:
        """Put ``item``, taken by a slot and paused (preempted), back at the head of its
        tenant's lane (``last``: at its tail, behind those waiting), waiting from now
        (:meth:`FairQueue.requeue`; ``refund`` as there), past every bound (it was admitted
        before); an idle slot may take it at once. False (nothing done) if the mailbox is closed."""
        if self.closed or self.queue.held_of(item) is None:
            return False
        self.queue.requeue(item, self._clock(), last=last, refund=refund)
        self._dispatch()
        return True

    def done(self, item: T) -> None:
        """``item``, taken by a slot, has ended: its tenant holds one slot less, and a request of
        that tenant held back by its cap may now go to an idle slot."""
        self.queue.done(item)
        self._dispatch()

    def receiver(self) -> MailboxReceiver[T]:
        """A receiver for one slot; close it when the slot stops."""
        return MailboxReceiver(self)

    def close(self, error: Callable[[], Exception], *, keep: Callable[[T], bool] | None = None) -> list[T]:
        """Refuse new items with ``error()`` and return the items that were still waiting, but
        those ``keep`` holds to: they stay queued and the slots still take them (a drain lets
        a preempted request resume); a later close returns them."""
        self._closed_error = error
        left = self.queue.drain(keep)
        self._dispatch()
        self._end_idle_waits()
        self._freed()
        return left

    def _end_idle_waits(self) -> None:
        """Closed and nothing left: each idle wait ends with EndOfStream."""
        if self.closed and not self.queue:
            for waiter in self._waiters:
                waiter.event.set()  # not handed: the wait ends with EndOfStream

    def _has_room(self, n: int) -> bool:
        return len(self.queue) + n <= self.capacity + len(self._waiters)

    def _check_open(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error()

    def _take(self) -> T | None:
        item = self.queue.pop(self._clock())
        if item is not None:
            self._freed()
            self._end_idle_waits()  # closed, and that was the last one kept
            if self._on_take is not None and (held := self.queue.held_of(item)) is not None:
                self._on_take(item, held)
        return item

    def _dispatch(self) -> None:
        """Hand waiting items to idle receivers, as the queue orders them."""
        while self._waiters:
            item = self._take()
            if item is None:
                return
            waiter = self._waiters.popleft()
            waiter.item, waiter.handed = item, True
            waiter.event.set()

    def _put_back(self, item: T | None) -> None:
        if item is not None:
            self.queue.put_back(item)
            self._dispatch()

    def _freed(self) -> None:
        room, self._room = self._room, anyio.Event()
        room.set()

    def statistics(self) -> MailboxStatistics:
        """A snapshot of depth, capacity and admission counts."""
        return MailboxStatistics(
            depth=len(self.queue),
            capacity=self.capacity,
            admitted=self._admitted,
            rejected=self._rejected,
            closed=self._closed_error is not None,
        )
