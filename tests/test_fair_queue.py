"""The scheduler queue's order (runtime.core.fair_queue), pure: priority classes, weighted fair
queuing between tenants, aging, caps, choice groups; properties with hypothesis."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.core.errors import TenantQueueFullError
from runtime.core.fair_queue import FairQueue, Placement, QueuePolicy


@dataclass(eq=False)
class Req:
    """A request as the queue sees it (compared by identity)."""

    name: str
    priority: int = 0
    tenant: str = ""


def push(q: FairQueue[Req], r: Req, now_s: float = 0.0, cost: float = 1.0) -> Req:
    q.push([r], Placement(priority=r.priority, tenant=r.tenant, cost=cost), now_s=now_s)
    return r


def drain_by_pop(q: FairQueue[Req], now_s: float = 0.0) -> list[Req]:
    out = []
    while (r := q.pop(now_s)) is not None:
        out.append(r)
    return out


def test_a_higher_priority_request_behind_twenty_goes_next() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy())
    for i in range(20):
        push(q, Req(f"low{i}"), now_s=i * 0.01)
    high = push(q, Req("high", priority=5), now_s=1.0)
    assert q.order(1.0)[0] is high
    assert q.pop(1.0) is high
    assert [r.name for r in drain_by_pop(q, 1.0)] == [f"low{i}" for i in range(20)]


def test_aging_puts_a_low_request_first_once_it_has_waited_aging_s() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy(aging_s=5.0))
    low = push(q, Req("low", priority=-1), now_s=0.0)
    for i in range(10):
        push(q, Req(f"high{i}", priority=1), now_s=1.0 + i)
    assert q.pop(4.9) is not low  # not aged yet: the high ones go first
    assert q.pop(5.0) is low  # waited aging_s: before every other
    assert all(r.priority == 1 for r in drain_by_pop(q, 5.0))


def test_weights_three_to_one_share_the_slots_three_to_one() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy(weights={"a": 3.0, "b": 1.0}))
    for i in range(400):
        push(q, Req(f"a{i}", tenant="a"))
        push(q, Req(f"b{i}", tenant="b"))
    served = Counter(q.pop(0.0).tenant for _ in range(400))  # type: ignore[union-attr]
    assert served == {"a": 300, "b": 100}


def test_a_tenant_back_from_idle_banks_no_credit() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy())
    for i in range(50):
        push(q, Req(f"a{i}", tenant="a"))
    for _ in range(40):
        q.pop(0.0)
    for i in range(10):  # b was idle while a was served 40 times: it gets half, not all, from now
        push(q, Req(f"b{i}", tenant="b"))
    tenants = [q.pop(0.0).tenant for _ in range(10)]  # type: ignore[union-attr]
    assert Counter(tenants) == {"a": 5, "b": 5}


def test_a_flooding_tenant_does_not_hold_back_a_later_one() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy())
    for i in range(40):
        push(q, Req(f"a{i}", tenant="a"))
    bs = [push(q, Req(f"b{i}", tenant="b")) for i in range(4)]
    order = q.order(0.0)
    assert [order.index(b) for b in bs] == [1, 3, 5, 7]  # interleaved, not after the 40


def test_a_tenant_at_its_slot_cap_is_passed_over_until_one_ends() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy(tenant_max_slots=2))
    a = [push(q, Req(f"a{i}", tenant="a")) for i in range(4)]
    b = push(q, Req("b", tenant="b"))
    taken = [q.pop(0.0), q.pop(0.0), q.pop(0.0)]
    assert set(map(id, taken)) == {id(a[0]), id(a[1]), id(b)}
    assert q.pop(0.0) is None  # a holds 2 slots; nothing else waits
    q.done(a[0])
    assert q.pop(0.0) is a[2]
    assert q.running("a") == 2 and q.running("b") == 1


def test_a_tenant_over_its_queue_cap_is_refused_while_others_are_admitted() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy(tenant_max_queued=3))
    for i in range(3):
        push(q, Req(f"a{i}", tenant="a"))
    with pytest.raises(
        TenantQueueFullError, match=r"tenant 'a' has 3 requests waiting.*tenant_max_queued"
    ) as e:
        push(q, Req("a3", tenant="a"))
    assert e.value.reason == "tenant_cap"
    push(q, Req("b", tenant="b"))
    assert len(q) == 4 and q.queued("a") == 3


def test_a_choice_group_starts_when_the_cap_has_room_for_all_then_goes_together() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy(tenant_max_slots=3))
    single = push(q, Req("a", tenant="a"), now_s=0.0)
    assert q.pop(0.0) is single  # a holds 1 of its 3 slots
    group = [Req(f"g{i}", tenant="a") for i in range(3)]
    q.push(group, Placement(tenant="a"), now_s=0.0)
    other = push(q, Req("b", tenant="b"), now_s=0.0)
    assert q.pop(0.0) is other  # the 3 choices do not fit in a's 2 free slots: b goes first
    assert q.pop(0.0) is None
    q.done(single)
    assert [q.pop(0.0) for _ in range(3)] == group  # now all 3 fit: the whole group goes
    assert q.running("a") == 3


def test_removing_one_choice_removes_the_group_and_put_back_restores_the_head() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy())
    group = [Req(f"g{i}") for i in range(2)]
    q.push(group, Placement(), now_s=0.0)
    assert q.remove(group[1]) and len(q) == 0 and not q.remove(group[0])
    first, second = push(q, Req("first"), 1.0), push(q, Req("second"), 2.0)
    assert q.pop(3.0) is first
    q.put_back(first)
    assert q.order(3.0) == [first, second] and q.running("") == 0


# -- properties --------------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"), st.integers(-2, 2), st.sampled_from("abc"), st.integers(1, 3), st.integers(1, 5)
        ),
        st.tuples(st.just("pop")),
        st.tuples(st.just("done"), st.integers(0, 1000)),
        st.tuples(st.just("remove"), st.integers(0, 1000)),
        st.tuples(st.just("put_back"), st.integers(0, 1000)),
        st.tuples(st.just("requeue"), st.integers(0, 1000), st.booleans()),
        st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    ),
    max_size=80,
)
POLICIES = st.builds(
    QueuePolicy,
    weights=st.dictionaries(st.sampled_from("abc"), st.floats(0.25, 4.0), max_size=3),
    tenant_max_queued=st.integers(0, 6),
    tenant_max_slots=st.integers(0, 3),
    aging_s=st.sampled_from([math.inf, 2.0, 5.0]),
)


@settings(max_examples=300, deadline=None)
@given(policy=POLICIES, ops=OPS)
def test_every_item_is_served_or_removed_exactly_once_and_the_caps_hold(
    policy: QueuePolicy, ops: list[tuple[Any, ...]]
) -> None:
    q: FairQueue[Req] = FairQueue(policy)
    now, pushed, taken, removed, held = 0.0, list[Req](), list[Req](), list[Req](), list[Req]()
    group_of: dict[int, list[Req]] = {}
    put_backs = 0
    for op in ops:
        if op[0] == "push":
            _, priority, tenant, n, cost = op
            items = [Req(f"r{len(pushed) + i}", priority, tenant) for i in range(n)]
            try:
                q.push(items, Placement(priority=priority, tenant=tenant, cost=float(cost)), now_s=now)
            except TenantQueueFullError:
                assert q.queued(tenant) + n > policy.tenant_max_queued > 0
                continue
            pushed += items
            group_of.update({id(r): items for r in items})
        elif op[0] == "pop":
            waiting = {id(r) for r, *_ in q.waiting()}
            r = q.pop(now)
            if r is not None:
                assert id(r) in waiting
                taken.append(r)
                held.append(r)
        elif op[0] in ("done", "put_back", "requeue") and held:
            r = held.pop(op[1] % len(held))
            if op[0] == "done":
                q.done(r)
            else:
                if op[0] == "put_back":
                    q.put_back(r)
                else:
                    q.requeue(r, now, last=op[2])  # a preempted request
                assert q.held_of(r) is None and _waiting(q, r)
                taken.remove(r)
                put_backs += 1
        elif op[0] == "remove" and pushed:
            r = pushed[op[1] % len(pushed)]
            before, was_waiting = [x for x in group_of[id(r)] if _waiting(q, x)], _waiting(q, r)
            assert q.remove(r) == was_waiting
            if was_waiting:
                assert not any(_waiting(q, x) for x in group_of[id(r)])  # the whole group goes
                removed += before
        elif op[0] == "tick":
            now += op[1]
        assert len(q) == len(q.waiting()) == sum(q.queued(t) for t in "abc")
        if policy.tenant_max_slots:
            for t in "abc":
                # a choice group's rest goes past the cap, by at most the group's size less one
                assert q.running(t) <= policy.tenant_max_slots + 2
        if policy.tenant_max_queued:
            # an item put back was admitted before: it returns past the cap
            assert all(q.queued(t) <= policy.tenant_max_queued + put_backs for t in "abc")
    left = q.drain()
    assert len(q) == 0
    seen = Counter(id(r) for r in taken + left + removed)
    assert all(n == 1 for n in seen.values())  # never served twice, never both served and removed
    assert set(seen) == {id(r) for r in pushed}  # nothing lost


def _waiting(q: FairQueue[Req], r: Req) -> bool:
    return any(x is r for x, *_ in q.waiting())


@settings(max_examples=300, deadline=None)
@given(
    policy=POLICIES.map(lambda p: QueuePolicy(weights=p.weights, aging_s=p.aging_s)),
    pushes=st.lists(
        st.tuples(st.integers(-2, 2), st.sampled_from("abc"), st.floats(0.0, 1.0), st.integers(1, 5)),
        max_size=30,
    ),
    pops_before=st.integers(0, 10),
    now=st.floats(0.0, 40.0),
)
def test_the_projected_order_is_the_order_pops_serve_and_priority_is_strict(
    policy: QueuePolicy, pushes: list[tuple[int, str, float, int]], pops_before: int, now: float
) -> None:
    q: FairQueue[Req] = FairQueue(policy)
    t = 0.0
    for i, (priority, tenant, gap, cost) in enumerate(pushes):
        t += gap
        push(q, Req(f"r{i}", priority, tenant), now_s=t, cost=float(cost))
        if i < pops_before:
            q.pop(t)
    now += t
    order = q.order(now)
    served = drain_by_pop(q, now)
    assert served == order
    aged = [r for r in served if _aged(r, pushes, now, policy.aging_s)]
    assert served[: len(aged)] == aged  # the aged go first ...
    rest = served[len(aged) :]
    assert [r.priority for r in rest] == sorted((r.priority for r in rest), reverse=True)  # ... then by class


def _aged(r: Req, pushes: list[tuple[int, str, float, int]], now: float, aging_s: float) -> bool:
    i = int(r.name[1:])
    return sum(p[2] for p in pushes[: i + 1]) <= now - aging_s


def test_tenants_that_come_and_go_are_forgotten() -> None:
    q: FairQueue[Req] = FairQueue(QueuePolicy())
    push(q, Req("steady", tenant="steady"))
    push(q, Req("steady", tenant="steady"))
    for i in range(1000):  # the class never empties; a thousand tenants send one request each
        push(q, Req("steady", tenant="steady"))
        push(q, Req(f"t{i}", tenant=f"t{i}"))
        for _ in range(2):
            x = q.pop(0.0)
            assert x is not None
            q.done(x)
    assert len(q) == 2 and all(r.tenant == "steady" for r, *_ in q.waiting())
    assert len(q._classes[0].lanes) < 10  # the idle tenants' lanes are gone
    assert set(q._queued) == {"steady"} and not q._running  # no count is kept for a tenant with none
