"""FreeSlotsRouter: Ray Serve's RequestRouter for Engine replicas, ranked by free slots.

Serve tries the tiers in order and, within a tier, the replica with the shortest queue that is
under ``max_ongoing_requests``. Our tiers, from each replica's ``record_routing_stats`` (about
every second; stale figures cost only evenness, Serve's own cap still holds):

1. replicas with free slots (most first), and replicas that have not reported yet (new ones);
2. replicas whose slots are all busy but whose mailbox has room (shortest mailbox first);
3. replicas with a full mailbox, or not ready;
4. replicas under memory pressure (slots cut or shrinking), whatever their figures.

Routers run in every caller (the Ingress, Serve's proxy) and are pickled there: this module
imports only Ray's router API and our records, never a backend (llama_cpp).
"""

from __future__ import annotations

from typing import Any

import msgspec
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from runtime.ray_serve.wire import RoutingStats

__all__ = ["FreeSlotsRouter", "rank"]


def _stats(replica: RunningReplica) -> RoutingStats | None:
    raw: dict[str, Any] = replica.routing_stats or {}
    try:
        return msgspec.convert(raw, RoutingStats)
    except msgspec.ValidationError:
        return None  # not reported yet (a new replica), or an older replica's shape


def _tier(stats: RoutingStats | None) -> tuple[int, int]:
    """(tier, order within it): lower first."""
    if stats is None:
        return 0, 0
    if stats.memory_pressure:
        return 3, stats.queue_depth
    if not stats.ready:
        return 2, stats.queue_depth
    if stats.free_slots > 0:
        return 0, -stats.free_slots
    if stats.queue_depth < stats.queue_capacity:
        return 1, stats.queue_depth
    return 2, stats.queue_depth


def rank(replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
    """``replicas`` in tiers (see the module docstring), each sorted best first; empty tiers
    left out."""
    keyed = sorted(((_tier(_stats(r)), i, r) for i, r in enumerate(replicas)), key=lambda k: (k[0], k[1]))
    tiers: dict[int, list[RunningReplica]] = {}
    for (tier, _), _, replica in keyed:
        tiers.setdefault(tier, []).append(replica)
    return [tiers[t] for t in sorted(tiers)]


class FreeSlotsRouter(FIFOMixin, RequestRouter):
    """Ranks Engine replicas by free slots and mailbox depth (see the module docstring)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """The candidates in tiers, best first (Serve's RequestRouter API)."""
        return rank(candidate_replicas)
