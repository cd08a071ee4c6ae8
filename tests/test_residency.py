"""Property tests of the placement plan (runtime.core.residency): what is evicted or shrunk
to load one more model, and when the answer is to wait or to refuse."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from runtime.core.residency import Fits, NoRoom, Resident, Wait, plan_room

MiB = 1 << 20


@st.composite
def residents(draw: st.DrawFn) -> list[Resident]:
    n = draw(st.integers(0, 5))
    out = []
    for i in range(n):
        slots = draw(st.integers(1, 8))
        slot_bytes = draw(st.integers(0, 64)) * MiB
        weights = draw(st.integers(1, 512)) * MiB
        resident = Resident(
            name=f"m{i}", resident_bytes=weights + slots * slot_bytes, slot_bytes=slot_bytes, slots=slots,
            min_slots=draw(st.integers(1, slots)), busy_slots=draw(st.integers(0, slots)), busy=draw(st.booleans()),
            pinned=draw(st.booleans()), last_used_s=draw(st.floats(0, 100)),
        )  # fmt: skip
        out.append(resident)
    return out


def freed(plan: Fits, models: list[Resident]) -> int:
    by_name = {r.name: r for r in models}
    total = sum(by_name[n].resident_bytes for n in plan.evictions)
    return total + sum((by_name[n].slots - to) * by_name[n].slot_bytes for n, to in plan.shrinks.items())


@given(
    needed=st.integers(1, 2048).map(lambda m: m * MiB),
    free=st.one_of(st.none(), st.integers(-512, 2048).map(lambda m: m * MiB)),
    models=residents(),
    cap=st.integers(1, 6),
)
def test_a_plan_that_fits_makes_room_and_touches_no_busy_or_pinned_model(
    needed: int, free: int | None, models: list[Resident], cap: int
) -> None:
    plan = plan_room(needed, free, models, cap)
    by_name = {r.name: r for r in models}
    if isinstance(plan, Fits):
        if free is not None:
            assert free + freed(plan, models) >= needed  # the new model fits
        assert len(models) - len(plan.evictions) + 1 <= cap  # the cap holds
        assert len(set(plan.evictions)) == len(plan.evictions)
        for name in plan.evictions:
            assert not by_name[name].busy and not by_name[name].pinned  # never a busy or pinned one
            assert name not in plan.shrinks
        for name, to in plan.shrinks.items():
            r = by_name[name]
            assert max(r.min_slots, r.busy_slots) <= to < r.slots  # only idle slots, never below min
    elif isinstance(plan, NoRoom):
        assert plan.needed_bytes == needed
        unpinned = sum(1 for r in models if not r.pinned)
        if free is not None and len(models) + 1 - cap <= unpinned:
            assert needed > free + plan.reclaimable_bytes  # really nothing can make room
    else:
        assert isinstance(plan, Wait)
        # once every model is idle, the same request fits
        quiet = [msgspec.structs.replace(r, busy=False, busy_slots=0) for r in models]
        assert isinstance(plan_room(needed, free, quiet, cap), Fits)


@given(models=residents(), cap=st.integers(1, 6))
def test_room_to_spare_changes_nothing(models: list[Resident], cap: int) -> None:
    plan = plan_room(1, 1 << 40, models, max(cap, len(models) + 1))
    assert plan == Fits()


def test_idle_slots_go_before_idle_models_and_the_least_recently_used_first() -> None:
    a = Resident(name="a", resident_bytes=100 * MiB + 4 * 10 * MiB, slot_bytes=10 * MiB, slots=4, min_slots=1,
                 busy_slots=1, busy=True, pinned=False, last_used_s=5.0)  # fmt: skip
    b = Resident(name="b", resident_bytes=200 * MiB, slot_bytes=0, slots=1, min_slots=1, busy_slots=0,
                 busy=False, pinned=False, last_used_s=1.0)  # fmt: skip
    c = Resident(name="c", resident_bytes=300 * MiB, slot_bytes=0, slots=1, min_slots=1, busy_slots=0,
                 busy=False, pinned=False, last_used_s=2.0)  # fmt: skip
    assert plan_room(50 * MiB, 25 * MiB, [a, b, c], 4) == Fits(shrinks={"a": 1})  # 3 idle slots of a: 30 MiB
    assert plan_room(250 * MiB, 25 * MiB, [a, b, c], 4) == Fits(shrinks={"a": 1}, evictions=("b",))
    assert plan_room(260 * MiB, 25 * MiB, [a, b, c], 4) == Fits(evictions=("b", "c"))  # LRU; a kept whole
    assert plan_room(100 * MiB, 25 * MiB, [a, b, c], 3) == Fits(evictions=("b",))  # the cap: b goes anyway
    pinned = msgspec.structs.replace(b, pinned=True)
    assert isinstance(plan_room(900 * MiB, 0, [pinned], 4), NoRoom)
    busy = msgspec.structs.replace(b, busy=True)
    assert isinstance(plan_room(150 * MiB, 0, [busy], 4), Wait)
    assert isinstance(plan_room(250 * MiB, 0, [busy], 4), NoRoom)
