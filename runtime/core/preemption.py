"""Which running request gives way to a request that has to wait while every slot is busy
(preemption by snapshot: actors.preemption parks it). Pure: no clock, no event loop.

- Priority: the waiting request claims a running one of a strictly lower priority, the lowest,
  and among equals the one started last (it has the least to lose, as vLLM chooses).
- Fair share, within the waiting request's class: the slots its class holds are shared among
  the tenants that run there and the waiting request's, by their weights. A tenant that holds
  fewer slots than the whole part of its share claims one from the tenant furthest over the
  rounded-up part of its own (that tenant's request started last). The two roundings keep a
  share from passing back and forth: neither tenant can claim the slot back.

A running request asked already (its slot has not answered) is another waiting request's claim
and is not chosen again; in the fair share it counts as the claimant tenant's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Running", "victim"]


@dataclass(frozen=True, slots=True)
class Running:
    """A running request as the choice sees it."""

    priority: int
    started_s: float
    asked: bool
    """Asked to give way already (its slot has not answered)."""
    tenant: str = ""


def _latest(running: Sequence[Running], indexes: list[int]) -> int:
    return max(indexes, key=lambda i: running[i].started_s)


def victim(
    priority: int,
    running: Sequence[Running],
    *,
    tenant: str = "",
    weight: Callable[[str], float] | None = None,
) -> int | None:
    """The index in ``running`` of the request to ask to give way to one of ``priority`` and
    ``tenant``, or None. ``weight`` gives a tenant's weight; None: no fair-share claims."""
    free = [i for i, r in enumerate(running) if not r.asked]
    lower = [i for i in free if running[i].priority < priority]
    if lower:
        lowest = min(running[i].priority for i in lower)
        return _latest(running, [i for i in lower if running[i].priority == lowest])
    if weight is None:
        return None
    same = [r for r in running if r.priority == priority]
    held: dict[str, int] = {tenant: sum(r.asked for r in same)}  # a slot on its way: the claimant's
    for r in same:
        if not r.asked:
            held[r.tenant] = held.get(r.tenant, 0) + 1
    tenants = set(held)
    total = sum(weight(t) for t in tenants)
    share = {t: len(same) * weight(t) / total for t in tenants}
    if held.get(tenant, 0) >= math.floor(share[tenant]):
        return None  # it holds its share already
    over = {t: n - math.ceil(share[t]) for t, n in held.items() if t != tenant and n > math.ceil(share[t])}
    if not over:
        return None
    most = max(over, key=lambda t: over[t])
    mine = [i for i in free if running[i].priority == priority and running[i].tenant == most]
    return _latest(running, mine) if mine else None
