"""Which running request gives way to a request of a higher priority that has to wait
(preemption by snapshot: actors.preemption parks it). Pure: no clock, no event loop.

A request admitted while every slot is busy claims one running request of a strictly lower
priority: the lowest, and among equals the one started last (it has the least to lose, as vLLM
chooses). One asked already (its slot has not answered) is another waiting request's claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Running", "victim"]


@dataclass(frozen=True, slots=True)
class Running:
    """A running request as the choice sees it."""

    priority: int
    started_s: float
    asked: bool
    """Asked to give way already (its slot has not answered)."""


def victim(priority: int, running: Sequence[Running]) -> int | None:
    """The index in ``running`` of the request to ask to give way to one of ``priority``, or
    None when none runs at a lower priority (or those are asked already)."""
    best: int | None = None
    for i, r in enumerate(running):
        if r.asked or r.priority >= priority:
            continue
        if best is None or (r.priority, -r.started_s) < (running[best].priority, -running[best].started_s):
            best = i
    return best
