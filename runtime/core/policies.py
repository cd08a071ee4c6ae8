"""Pure policy functions of the Supervisor, free of state so they are easy to test.

Sizes are bytes, times seconds on one monotonic clock, counts slots.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["backoff_s", "headroom_bytes", "resize_due", "restart_allowed", "slots_that_fit", "target_slots"]


def restart_allowed(restarts_s: Sequence[float], now_s: float, intensity: int, period_s: float) -> bool:
    """Whether one more restart at ``now_s`` keeps within the restart intensity (Erlang/OTP).

    :param restarts_s: times of earlier restarts.
    :returns: False when ``intensity`` restarts already happened within the last ``period_s``
        seconds, i.e. this one would be more than ``intensity`` in ``period_s``.
    """
    recent = sum(1 for t in restarts_s if now_s - t < period_s)
    return recent < intensity


def backoff_s(recent_restarts: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait before a restart: exponential in the recent restarts, capped, with full
    jitter in [50%, 100%] so that restarts of many slots do not fall in step."""
    return min(cap_s, base_s * 2.0 ** max(0, recent_restarts - 1)) * rng.uniform(0.5, 1.0)


def headroom_bytes(total_bytes: int, fraction: float, minimum_bytes: int) -> int:
    """Memory kept free: ``fraction`` of the device, at least ``minimum_bytes``."""
    return max(int(total_bytes * fraction), minimum_bytes)


def slots_that_fit(free_bytes: int, slots_now: int, kv_bytes_per_slot: int, headroom: int) -> int:
    """Slots whose KV cache fits: the free memory plus the KV this runtime holds now (a new
    context replaces it), less the headroom; never negative."""
    usable = free_bytes + slots_now * kv_bytes_per_slot - headroom
    return max(0, usable // max(1, kv_bytes_per_slot))


def target_slots(
    free_bytes: int,
    slots_now: int,
    kv_bytes_per_slot: int,
    headroom: int,
    min_slots: int,
    max_slots: int,
    hysteresis: float,
) -> int:
    """The slot count to run with, given a reading of free memory.

    Shrinks as soon as the current count no longer fits; grows only when the larger count fits
    with ``hysteresis`` x one slot's KV to spare, so readings that wobble around a threshold
    cause at most one resize. Clamped to [min_slots, max_slots].
    """
    fit = slots_that_fit(free_bytes, slots_now, kv_bytes_per_slot, headroom)
    if fit < slots_now:
        target = fit
    else:
        margin = int(hysteresis * kv_bytes_per_slot)
        target = max(slots_now, slots_that_fit(free_bytes - margin, slots_now, kv_bytes_per_slot, headroom))
    return min(max_slots, max(min_slots, target))


def resize_due(
    target: int, slots_now: int, last_resize_s: float | None, now_s: float, cooldown_s: float
) -> bool:
    """Whether to resize now: the target differs and the cooldown since the last resize passed."""
    if target == slots_now:
        return False
    return last_resize_s is None or now_s - last_resize_s >= cooldown_s
