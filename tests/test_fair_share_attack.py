"""Fair-share preemption under attack: the pure chooser's invariants (hypothesis) over tenants
and weights."""

from __future__ import annotations

import math
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.core.preemption import Running, victim

TENANTS = ["", "a", "b", "c", "d"]


def _weights(table: dict[str, float]) -> Callable[[str], float]:
    return lambda tenant: table.get(tenant, 1.0)


def _held(running: list[Running]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in running:
        out[r.tenant] = out.get(r.tenant, 0) + 1
    return out


def _share(held: dict[str, int], claimant: str, weight: Callable[[str], float]) -> dict[str, float]:
    tenants = {*held, claimant}
    total = sum(weight(t) for t in tenants)
    slots = sum(held.values())
    return {t: slots * weight(t) / total for t in tenants}


running_st = st.lists(
    st.tuples(st.sampled_from(TENANTS), st.floats(0, 100, allow_nan=False)), min_size=0, max_size=12
).map(lambda rows: [Running(0, s, False, t) for t, s in rows])
weights_st = st.dictionaries(st.sampled_from(TENANTS), st.sampled_from([0.1, 0.5, 1.0, 3.0, 7.0, 1e-6]))


@settings(max_examples=400, deadline=None)
@given(running_st, weights_st, st.sampled_from(TENANTS))
def test_a_claim_takes_from_a_tenant_over_its_share_and_no_one_can_claim_it_back(
    running: list[Running], table: dict[str, float], claimant: str
) -> None:
    weight = _weights(table)
    i = victim(0, running, tenant=claimant, weight=weight)
    held = _held(running)
    share = _share(held, claimant, weight)
    if i is None:
        return
    loser = running[i].tenant
    assert loser != claimant
    assert held.get(claimant, 0) < math.floor(share[claimant])  # it was under its share
    assert held[loser] - 1 >= math.ceil(share[loser])  # the victim's tenant keeps its share
    assert running[i].started_s == max(r.started_s for r in running if r.tenant == loser)
    after = [*running[:i], *running[i + 1 :], Running(0, 1000.0, False, claimant)]
    back = victim(0, after, tenant=loser, weight=weight)
    assert back is None or after[back].tenant != claimant  # the loser cannot take it back


@settings(max_examples=300, deadline=None)
@given(running_st, weights_st, st.sampled_from(TENANTS))
def test_a_tenant_at_or_above_the_whole_part_of_its_share_never_claims(
    running: list[Running], table: dict[str, float], claimant: str
) -> None:
    weight = _weights(table)
    share = _share(_held(running), claimant, weight)
    if _held(running).get(claimant, 0) >= math.floor(share[claimant]):
        assert victim(0, running, tenant=claimant, weight=weight) is None


@settings(max_examples=300, deadline=None)
@given(running_st, weights_st, st.sampled_from(TENANTS), st.integers(1, 4))
def test_claims_applied_one_after_another_end_with_everyone_settled(
    running: list[Running], table: dict[str, float], claimant: str, arrivals: int
) -> None:
    """Tenants arriving one by one, each claim applied at once: the claims are bounded by the
    slots (each moves a slot from over a share to under one), never a cycle."""
    weight = _weights(table)
    state = list(running)
    moves = 0
    for k in range(arrivals * len(TENANTS)):
        t = TENANTS[(TENANTS.index(claimant) + k) % len(TENANTS)]
        i = victim(0, state, tenant=t, weight=weight)
        if i is not None:
            state = [*state[:i], *state[i + 1 :], Running(0, 1000.0 + k, False, t)]
            moves += 1
    assert moves <= len(running)
