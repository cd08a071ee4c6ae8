"""Which idle slot takes a request: the one whose KV cells share the most of its prompt.

llama.cpp's server does the same (``--slot-prompt-similarity``, 0.10: the slot whose cached
prompt shares the largest part of the new one, if that part is at least the minimum, else the
least recently used slot). The slots still pull from the mailbox (work-pulling): one idle slot
at a time, the *door*, waits on the mailbox; when a request comes it tokenizes the prompt, and
:func:`choose_slot` names the idle slot that serves it. The door hands it over (that slot wakes)
and keeps the door, or serves it itself and passes the door on to the most recently idle slot.
Where no prefix can choose (the prefix cache off, or a share above 1) there is no door: each
idle slot waits on the mailbox, which serves the least recently idle first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import anyio

from runtime.core.records import PlacementStatistics

__all__ = ["Placement", "PlacementSlot", "choose_slot", "common_prefix"]

T = TypeVar("T")


_CHUNK = 64
"""Tokens compared at once (a slice comparison, in C) before one by one."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    for start in range(0, n, _CHUNK):
        end = min(start + _CHUNK, n)
        if list(a[start:end]) != list(b[start:end]):  # the first difference is in this chunk
            for i in range(start, end):
                if a[i] != b[i]:
                    return i
    return n


def choose_slot(prompt: Sequence[int] | None, cached: Sequence[Sequence[int]], min_share: float) -> int:
    """The index in ``cached`` (each idle slot's cached tokens, least recently used first) of the
    slot that should serve ``prompt``: the longest common prefix if it is at least ``min_share``
    of the prompt, else the least recently used (index 0). ``prompt`` None (not tokenized): 0.

    :raises ValueError: if ``cached`` is empty.
    """
    if not cached:
        raise ValueError("no idle slot to choose from")
    if not prompt:
        return 0
    head = list(prompt)
    best, best_len = 0, 0
    for i, tokens in enumerate(cached):
        # Only a slot that shares more than the best so far is measured: its next token agrees,
        # and the ones before it (compared at once). 128 idle slots that share a long system
        # prompt cost a comparison of one token each, not a loop over the prompt each.
        k = best_len
        if k < len(tokens) and k < len(head) and tokens[k] == head[k] and list(tokens[:k]) == head[:k]:
            best, best_len = i, common_prefix(tokens, head)
    return best if best_len > 0 and best_len >= min_share * len(prompt) else 0


class PlacementSlot(Protocol):
    """What the placement needs from a slot."""

    @property
    def cached_tokens(self) -> Sequence[int]:
        """The tokens its sequence's KV cells hold (a finished conversation)."""
        ...

    @property
    def retiring(self) -> bool:
        """It takes no more requests."""
        ...


@dataclass(eq=False)
class _Waiter(Generic[T]):
    slot: PlacementSlot
    wake: anyio.Event = field(default_factory=anyio.Event)
    handed: tuple[T, list[int] | None] | None = None
    stopped: bool = False


class Placement(Generic[T]):
    """The idle slots, least recently idle first, and the door among them.

    :param min_share: least part of a prompt the chosen slot's cells must share (else the least
        recently used idle slot takes it); above 1, prefixes never choose.
    :param by_prefix: False where no slot keeps a prefix (the prefix cache is off): then, as
        with ``min_share`` above 1, there is no door (see :meth:`take`).
    """

    def __init__(self, min_share: float, *, by_prefix: bool = True) -> None:
        self.min_share = min_share
        self._by_door = by_prefix and min_share <= 1
        self._idle: list[_Waiter[T]] = []
        self._door: _Waiter[T] | None = None
        self._by_prefix = 0
        self._by_lru = 0

    async def take(
        self,
        slot: PlacementSlot,
        receive: Callable[[], Awaitable[T]],
        tokenize: Callable[[T], Awaitable[list[int] | None]],
    ) -> tuple[T, list[int] | None] | None:
        """Wait until ``slot`` is given a request: returns it with its prompt's tokens (None
        where the door did not tokenize it), or None when ``receive`` ends (the mailbox closed,
        or this slot's receiver was closed) or :meth:`stop` was called for it.

        ``receive`` is this slot's own receive from the mailbox (used while it is the door);
        ``tokenize`` gives a request's prompt tokens (None: choose the least recently used).
        Where prefixes never choose, every idle slot waits on the mailbox itself, with no door:
        the mailbox hands requests to its waiting receivers in the order they began waiting,
        the least recently used first, as the choice would, and a burst reaches them all in one
        turn of the event loop instead of one turn a request.
        """
        if not self._by_door:
            return await self._receive(slot, receive)
        me: _Waiter[T] = _Waiter(slot)
        self._idle.append(me)
        try:
            while True:
                if me.handed is not None:
                    return me.handed
                if me.stopped:
                    return None
                if self._door is not None and self._door is not me:
                    await me.wake.wait()
                    me.wake = anyio.Event()
                    continue
                self._door = me
                try:
                    item = await receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return None
                got = (item, await tokenize(item))
                target = self._choose(got[1])
                if target is me:
                    return got
                target.handed = got
                self._idle.remove(target)
                target.wake.set()
        finally:
            if me in self._idle:
                self._idle.remove(me)
            if self._door is me:
                self._door = None
                self._pass_door()

    async def _receive(
        self, slot: PlacementSlot, receive: Callable[[], Awaitable[T]]
    ) -> tuple[T, list[int] | None] | None:
        """The slot's own wait on the mailbox, where there is no door (a retiring slot's
        receiver is closed: the wait ends)."""
        me: _Waiter[T] = _Waiter(slot)
        self._idle.append(me)
        try:
            item = await receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return None
        finally:
            self._idle.remove(me)
        self._by_lru += 1
        return item, None

    def _choose(self, prompt: list[int] | None) -> _Waiter[T]:
        free = [w for w in self._idle if w.handed is None and not w.stopped and not w.slot.retiring]
        if not free:  # only the door itself could be left (retiring while it tokenized)
            assert self._door is not None
            return self._door
        if not prompt:  # nothing to match: choose_slot's least recently used, without the scan
            self._by_lru += 1
            return free[0]
        i = choose_slot(prompt, [w.slot.cached_tokens for w in free], self.min_share)
        shared = common_prefix(free[i].slot.cached_tokens, prompt) if prompt else 0
        if shared and shared >= self.min_share * len(prompt or ()):
            self._by_prefix += 1
        else:
            self._by_lru += 1
        return free[i]

    def _pass_door(self) -> None:
        """Wake the most recently idle slot that has no request yet: it becomes the door. The
        least recently used, which the choice prefers, are then not the door: the door hands
        them requests and goes on receiving, one turn of the event loop a request (a door that
        serves its own request passes the door, a task switch more)."""
        for waiter in reversed(self._idle):
            if waiter.handed is None and not waiter.stopped:
                waiter.wake.set()
                return

    def stop(self, slot: PlacementSlot) -> None:
        """Make ``slot``'s :meth:`take` return None (unless a request was handed to it: then it
        returns that first); a door's is ended by closing its receiver."""
        for waiter in self._idle:
            if waiter.slot is slot:
                waiter.stopped = True
                waiter.wake.set()

    def statistics(self) -> PlacementStatistics:
        """How many requests went to a slot by prefix, and to the least recently used one."""
        return PlacementStatistics(
            idle=len(self._idle), by_prefix=self._by_prefix, least_recently_used=self._by_lru
        )
