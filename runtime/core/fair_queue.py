"""The scheduler queue's order, pure: which waiting request an idle slot takes next.

- Strict priority between classes: a request of a higher ``priority`` goes before every lower one.
- Weighted fair queuing between tenants within a class (start-time fair queuing): each tenant
  has a virtual time that grows by ``cost / weight`` for each request it is served; the tenant
  with the least goes next. A tenant that comes back from idle starts at the class's current
  virtual time, so being idle banks no credit.
- First come, first served within a tenant.
- Aging: a request that has waited ``aging_s`` seconds or more goes before all others, oldest
  first, whatever its class (nothing waits for ever behind a stream of higher ones).
- Caps per tenant: queued requests (more are refused with TenantQueueFullError) and slots (a
  tenant at its cap is passed over until one of its requests ends).
- A request's n choices are one entry: once one is taken, the rest go next, past every cap
  (they run side by side, so they must not wait behind others).

No clock and no event loop here: the caller passes the time (seconds, any monotonic origin).
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from runtime.core.errors import TenantQueueFullError

__all__ = ["FairQueue", "Held", "Placement", "QueuePolicy"]

T = TypeVar("T")


@dataclass(frozen=True)
class QueuePolicy:
    """How the queue orders and bounds requests.

    :param weights: tenant -> weight (> 0); a tenant not named weighs 1.
    :param tenant_max_queued: requests one tenant may have waiting; 0: only ``capacity`` bounds.
    :param tenant_max_slots: slots one tenant may hold at once; 0: no cap.
    :param aging_s: seconds after which a waiting request goes before all others; inf: never.
    """

    weights: Mapping[str, float] = field(default_factory=dict)
    tenant_max_queued: int = 0
    tenant_max_slots: int = 0
    aging_s: float = math.inf

    def weight(self, tenant: str) -> float:
        """The tenant's weight (1 unless configured)."""
        return self.weights.get(tenant, 1.0)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request goes in the queue: its class, its tenant, and the work it stands for
    (its max_tokens: a tenant's virtual time grows by cost / weight when it is served)."""

    priority: int = 0
    tenant: str = ""
    cost: float = 1.0


@dataclass(eq=False)
class _Entry(Generic[T]):
    """One admitted request (or a request's n choices) waiting in the queue."""

    items: deque[T]
    priority: int
    tenant: str
    cost: float
    seq: int
    admitted_s: float


@dataclass(frozen=True, eq=False)
class Held(Generic[T]):
    """An item taken from the queue and not yet done: what it was queued with, and when taken."""

    item: T
    priority: int
    tenant: str
    cost: float
    seq: int
    admitted_s: float
    taken_s: float


@dataclass(eq=False)
class _Lane(Generic[T]):
    """One tenant's requests within one priority class."""

    entries: deque[_Entry[T]] = field(default_factory=deque)
    vtime: float = 0.0


@dataclass(eq=False)
class _Class(Generic[T]):
    """One priority class: its tenants' lanes and its virtual time."""

    lanes: dict[str, _Lane[T]] = field(default_factory=dict)
    vtime: float = 0.0
    size: int = 0


def _lower(counts: dict[str, int], tenant: str, n: int) -> None:
    """Take ``n`` from a tenant's count, forgetting a tenant at 0 (any name may come and go)."""
    left = counts[tenant] - n
    if left:
        counts[tenant] = left
    else:
        del counts[tenant]


class FairQueue(Generic[T]):
    """The waiting requests and the slots each tenant holds; see the module's docstring.

    Items are compared by identity; one item may be queued or held once at a time.
    """

    def __init__(self, policy: QueuePolicy) -> None:
        self.policy = policy
        self._classes: dict[int, _Class[T]] = {}
        self._priorities: list[int] = []  # ascending; the classes that hold entries
        self._entries: dict[int, _Entry[T]] = {}  # seq -> entry, in admission order
        self._where: dict[int, _Entry[T]] = {}  # id(item) -> its waiting entry
        self._queued: dict[str, int] = {}  # tenant -> items waiting
        self._held: dict[int, Held[T]] = {}  # id(item) -> it, for items taken and not yet done
        self._running: dict[str, int] = {}  # tenant -> items taken and not yet done
        self._next: _Entry[T] | None = None  # a choice group partly taken: its rest goes next
        self._seq = 0
        self._size = 0

    def __len__(self) -> int:
        """Items waiting."""
        return self._size

    # -- admission -----------------------------------------------------------------------------

    def push(self, items: Sequence[T], placement: Placement, *, now_s: float) -> None:
        """Queue ``items`` (one request, or its choices: one entry) as ``placement`` says.

        :raises TenantQueueFullError: if the tenant would have more than ``tenant_max_queued``
            (the global bound, ``max_queue``, is the mailbox's: it counts idle slots as room).
        """
        n, p, tenant = len(items), self.policy, placement.tenant
        if p.tenant_max_queued and self._queued.get(tenant, 0) + n > p.tenant_max_queued:
            raise TenantQueueFullError(tenant, p.tenant_max_queued)
        self._seq += 1
        self._insert(_Entry(deque(items), placement.priority, tenant, placement.cost, self._seq, now_s))

    def _insert(self, entry: _Entry[T]) -> None:
        cls = self._classes.get(entry.priority)
        if cls is None:
            cls = self._classes[entry.priority] = _Class()
            bisect.insort(self._priorities, entry.priority)
        lane = cls.lanes.get(entry.tenant)
        if lane is None:
            lane = cls.lanes[entry.tenant] = _Lane(vtime=cls.vtime)
        elif not lane.entries:
            lane.vtime = max(lane.vtime, cls.vtime)  # back from idle: no banked credit
        n = len(entry.items)
        lane.entries.append(entry)
        cls.size += n
        self._entries[entry.seq] = entry
        for item in entry.items:
            self._where[id(item)] = entry
        self._queued[entry.tenant] = self._queued.get(entry.tenant, 0) + n
        self._size += n

    def pop(self, now_s: float) -> T | None:
        """Take the next item to serve (it is then held for its tenant until :meth:`done`);
        None if nothing waits or every tenant that waits is at its slot cap."""
        entry = self._next
        if entry is None:
            entry = self._aged(now_s) or self._fair()
            if entry is None:
                return None
            self._charge(entry)
        item = entry.items.popleft()
        self._next = entry if entry.items else None
        if not entry.items:
            self._unlink(entry)
        self._classes[entry.priority].size -= 1
        del self._where[id(item)]
        _lower(self._queued, entry.tenant, 1)
        self._size -= 1
        self._held[id(item)] = Held(
            item, entry.priority, entry.tenant, entry.cost, entry.seq, entry.admitted_s, now_s
        )
        self._running[entry.tenant] = self._running.get(entry.tenant, 0) + 1
        self._drop_empty_class(entry.priority)
        return item

    def remove(self, item: T) -> bool:
        """Take ``item`` out of the queue without serving it (with the rest of its choices).

        :returns: whether it was waiting.
        """
        entry = self._where.get(id(item))
        if entry is None:
            return False
        for other in entry.items:
            del self._where[id(other)]
        n = len(entry.items)
        entry.items.clear()
        if self._next is entry:
            self._next = None
        self._unlink(entry)
        self._classes[entry.priority].size -= n
        _lower(self._queued, entry.tenant, n)
        self._size -= n
        self._drop_empty_class(entry.priority)
        return True

    def done(self, item: T) -> None:
        """``item``, taken by :meth:`pop`, has ended: its tenant holds one slot less (a no-op
        for an item that was never taken, or is done already)."""
        held = self._held.pop(id(item), None)
        if held is not None:
            _lower(self._running, held.tenant, 1)

    def put_back(self, item: T) -> None:
        """Return ``item``, taken by :meth:`pop` but not served (its taker was cancelled), to
        the head of its tenant's lane with its first admission time, past the tenant's queue
        cap (it was admitted before); a no-op if not held."""
        held = self._held.get(id(item))
        if held is None:
            return
        self.done(item)
        group = self._entries.get(held.seq)
        if group is not None:  # the rest of its choices still wait: it goes back in front of them
            group.items.appendleft(item)
            self._where[id(item)] = group
            self._classes[group.priority].size += 1
            self._queued[group.tenant] = self._queued.get(group.tenant, 0) + 1
            self._size += 1
            return
        entry = _Entry(deque([item]), held.priority, held.tenant, held.cost, held.seq, held.admitted_s)
        self._insert(entry)
        self._entries = dict(sorted(self._entries.items()))  # oldest first again
        lane = self._classes[entry.priority].lanes[entry.tenant]
        lane.entries.pop()
        lane.entries.appendleft(entry)

    def requeue(self, item: T, now_s: float, *, last: bool = False, refund: bool = True) -> None:
        """Return ``item``, taken by :meth:`pop` and not done (a preempted request), to its
        tenant's lane: at its head, or with ``last`` at its tail (behind those waiting: it gives
        way by hand); past the tenant's queue cap. It waits from ``now_s`` (aging counts from
        it: the time it ran was no wait), and its tenant gets back what serving it was charged
        (it is charged again when it resumes), unless not ``refund``: parked for another tenant
        of its class that was under its share, it keeps the charge, or its lane's virtual time
        would fall below the claimant's and the slot would go straight back to it. One of n
        choices whose rest still wait goes back in front of them (:meth:`put_back`). A no-op
        if not held."""
        held = self._held.get(id(item))
        if held is None:
            return
        if held.seq in self._entries:  # one of n choices whose rest still wait: back with them
            self.put_back(item)
            return
        self.done(item)
        cls = self._classes.get(held.priority)
        if refund and cls is not None and (lane := cls.lanes.get(held.tenant)) is not None:
            lane.vtime -= held.cost / self.policy.weight(held.tenant)  # (_insert bounds it by the class's)
        self._seq += 1
        entry = _Entry(deque([item]), held.priority, held.tenant, held.cost, self._seq, now_s)
        self._insert(entry)
        if not last:
            lane = self._classes[entry.priority].lanes[entry.tenant]
            lane.entries.pop()
            lane.entries.appendleft(entry)

    def drain(self, keep: Callable[[T], bool] | None = None) -> list[T]:
        """Take every waiting item out, in admission order (the queue is closing), but those
        ``keep`` holds to: they stay where they are."""
        left = [item for entry in list(self._entries.values()) for item in entry.items]
        if keep is not None:
            left = [item for item in left if not keep(item)]
        for item in left:
            self.remove(item)
        return left

    # -- reading -------------------------------------------------------------------------------

    def running(self, tenant: str) -> int:
        """Items of ``tenant`` taken and not yet done (the slots it holds)."""
        return self._running.get(tenant, 0)

    def queued(self, tenant: str) -> int:
        """Items of ``tenant`` waiting."""
        return self._queued.get(tenant, 0)

    def top_priority(self) -> int | None:
        """The highest priority among the waiting items (None: none waits)."""
        return self._priorities[-1] if self._priorities else None

    def held_of(self, item: T) -> Held[T] | None:
        """``item``'s record if it is taken and not yet done."""
        return self._held.get(id(item))

    def held(self) -> list[Held[T]]:
        """The items taken and not yet done, in the order they were taken."""
        return list(self._held.values())

    def waiting(self) -> list[tuple[T, int, str, float]]:
        """(item, priority, tenant, admitted_s) of each waiting item, in admission order."""
        return [(i, e.priority, e.tenant, e.admitted_s) for e in self._entries.values() for i in e.items]

    def order(self, now_s: float) -> list[T]:
        """The waiting items in the order they would be served if nothing else arrived and no
        slot cap held one back: the aged ones by age, then each class from the highest, within
        a class by the virtual times the tenants would reach."""
        aged_before = now_s - self.policy.aging_s
        first: list[T] = [] if self._next is None else list(self._next.items)
        aged = [e for e in self._entries.values() if e.admitted_s <= aged_before and e is not self._next]
        out = first + [i for e in aged for i in e.items]
        skip = {id(e) for e in aged}
        if self._next is not None:
            skip.add(id(self._next))
        charged: dict[tuple[int, str], float] = {}  # what serving the aged first adds to their lanes
        for e in aged:
            key = (e.priority, e.tenant)
            charged[key] = charged.get(key, 0.0) + e.cost * len(e.items) / self.policy.weight(e.tenant)
        for priority in reversed(self._priorities):
            tagged: list[tuple[float, int, _Entry[T]]] = []
            for tenant, lane in self._classes[priority].lanes.items():
                vtime, step = (
                    lane.vtime + charged.get((priority, tenant), 0.0),
                    1.0 / self.policy.weight(tenant),
                )
                for entry in lane.entries:
                    if id(entry) not in skip:
                        tagged.append((vtime, entry.seq, entry))
                        vtime += entry.cost * len(entry.items) * step
            tagged.sort(key=lambda t: (t[0], t[1]))
            out += [i for _, _, e in tagged for i in e.items]
        return out

    # -- internals -----------------------------------------------------------------------------

    def _eligible(self, tenant: str, n: int = 1) -> bool:
        """Whether ``tenant`` may take ``n`` more slots (a request's choices start together)."""
        cap = self.policy.tenant_max_slots
        return not cap or self._running.get(tenant, 0) + n <= cap

    def _aged(self, now_s: float) -> _Entry[T] | None:
        before = now_s - self.policy.aging_s
        for entry in self._entries.values():  # oldest first
            if entry.admitted_s > before:
                return None
            if self._eligible(entry.tenant, len(entry.items)):
                return entry
        return None

    def _fair(self) -> _Entry[T] | None:
        for priority in reversed(self._priorities):
            cls = self._classes[priority]
            best: _Lane[T] | None = None
            idle: list[str] = []
            for tenant, lane in cls.lanes.items():
                if not lane.entries:
                    if lane.vtime <= cls.vtime:  # it would start at the class's time anyway
                        idle.append(tenant)
                    continue
                if not self._eligible(tenant, len(lane.entries[0].items)):
                    continue
                if best is None or (lane.vtime, lane.entries[0].seq) < (best.vtime, best.entries[0].seq):
                    best = lane
            for tenant in idle:  # tenants come and go: a busy class forgets the idle ones
                del cls.lanes[tenant]
            if best is not None:
                return best.entries[0]
        return None

    def _charge(self, entry: _Entry[T]) -> None:
        """Advance the virtual times for serving ``entry`` (its choices are charged as one)."""
        cls = self._classes[entry.priority]
        lane = cls.lanes[entry.tenant]
        cls.vtime = max(cls.vtime, lane.vtime)  # the start tag of what is served now
        lane.vtime += entry.cost * len(entry.items) / self.policy.weight(entry.tenant)

    def _unlink(self, entry: _Entry[T]) -> None:
        self._entries.pop(entry.seq, None)
        lane = self._classes[entry.priority].lanes[entry.tenant]
        with contextlib.suppress(ValueError):  # taken from the lane already
            lane.entries.remove(entry)

    def _drop_empty_class(self, priority: int) -> None:
        if self._classes[priority].size == 0:  # lanes keep their virtual times while it is in use
            del self._classes[priority]
            self._priorities.remove(priority)
