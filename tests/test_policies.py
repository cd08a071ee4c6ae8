"""Property tests of the Supervisor's pure policies: fit, hysteresis, cooldown, restarts."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from runtime.core.policies import backoff_s, resize_due, restart_allowed, slots_that_fit, target_slots

MiB = 1 << 20
KV = 47 * MiB


@given(
    free=st.integers(0, 64 << 30),
    now=st.integers(1, 64),
    kv=st.integers(1, 1 << 30),
    head=st.integers(0, 1 << 30),
)
def test_what_fits_really_fits(free: int, now: int, kv: int, head: int) -> None:
    n = slots_that_fit(free, now, kv, head)
    assert n >= 0
    assert n * kv <= max(0, free + now * kv - head)  # it fits
    assert (n + 1) * kv > free + now * kv - head  # one more would not


@given(
    now=st.integers(1, 32),
    readings=st.lists(st.integers(-KV // 3, KV // 3), min_size=2, max_size=50),
    hysteresis=st.floats(0.5, 2.0),
)
def test_wobble_around_a_threshold_resizes_at_most_once(
    now: int, readings: list[int], hysteresis: float
) -> None:
    """Free memory that wobbles by less than the hysteresis margin around the point where the
    current count just fits moves the count at most once."""
    slots, moves = now, 0
    base = 0  # free memory at which exactly ``now`` slots fit, with no headroom
    for wobble in readings:
        target = target_slots(base + wobble + (slots - now) * -KV, slots, KV, 0, 1, 64, hysteresis)
        if target != slots:
            moves += 1
            slots = target
    assert moves <= 1


@given(now=st.integers(1, 32), free_slots=st.integers(-40, 40), lo=st.integers(1, 4), hi=st.integers(4, 64))
def test_target_shrinks_at_once_and_stays_in_bounds(now: int, free_slots: int, lo: int, hi: int) -> None:
    target = target_slots(free_slots * KV, now, KV, 0, lo, hi, 0.5)
    assert lo <= target <= hi
    if now + free_slots < now:  # the current count no longer fits
        assert target == max(lo, min(hi, now + free_slots))
    if free_slots >= 2 and hi > now:  # a whole slot and more than the 0.5-slot margin to spare
        assert target > now


@given(last=st.none() | st.floats(0, 100), now=st.floats(0, 200), cooldown=st.floats(0, 50))
def test_resize_waits_for_the_cooldown(last: float | None, now: float, cooldown: float) -> None:
    assert resize_due(3, 3, last, now, cooldown) is False
    due = resize_due(4, 3, last, now, cooldown)
    assert due == (last is None or now - last >= cooldown)


@given(times=st.lists(st.floats(0, 100), max_size=20), now=st.floats(100, 110), intensity=st.integers(0, 10))
def test_restart_window_counts_only_recent_restarts(times: list[float], now: float, intensity: int) -> None:
    recent = sum(1 for t in times if now - t < 5.0)
    assert restart_allowed(times, now, intensity, 5.0) == (recent < intensity)


@given(n=st.integers(0, 30), seed=st.integers(0, 1000))
def test_backoff_is_jittered_exponential_and_capped(n: int, seed: int) -> None:
    wait = backoff_s(n, 0.01, 1.0, random.Random(seed))
    full = min(1.0, 0.01 * 2.0 ** max(0, n - 1))
    assert 0.5 * full <= wait <= full
