"""Pure policy functions of the supervisor, kept free of state so they are easy to test."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["restart_allowed"]


def restart_allowed(restarts_s: Sequence[float], now_s: float, intensity: int, period_s: float) -> bool:
    """Whether one more restart at ``now_s`` keeps within the restart intensity (Erlang/OTP).

    :param restarts_s: times (seconds, one monotonic clock) of earlier restarts.
    :returns: False when ``intensity`` restarts already happened within the last ``period_s``
        seconds, i.e. this one would be more than ``intensity`` in ``period_s``.
    """
    recent = sum(1 for t in restarts_s if now_s - t < period_s)
    return recent < intensity
