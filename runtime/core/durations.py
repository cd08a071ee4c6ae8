"""Ollama's keep_alive: a Go duration or a number of seconds, as seconds."""

from __future__ import annotations

import math
import re

from runtime.core.errors import ConfigError

__all__ = ["KeepAlive", "parse_keep_alive"]

KeepAlive = str | float | int | None
"""A request's keep_alive: a duration (``"5m"``) or seconds; None: the model's own."""

_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: str | float | int) -> float:
    """Ollama's keep_alive in seconds: a number of seconds, or a Go duration (``"5m"``,
    ``"1h30m"``, ``"-1m"``); a bare number in text counts as seconds. Negative means forever
    (returned as ``math.inf``).

    :raises ConfigError: if it is neither.
    """
    if isinstance(value, bool):
        raise ConfigError(f"keep_alive is {value!r}; give a duration such as '5m' or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text.replace("+", ""):
                raise ConfigError(
                    f"keep_alive is {value[:40]!r}; give a duration such as '5m', '1h30m' or '-1', "
                    "or a number of seconds"
                ) from None
            negative = text.startswith("-")
            seconds = sum(abs(float(n)) * _UNIT_S[u] for n, u in parts) * (-1 if negative else 1)
    if math.isnan(seconds):
        raise ConfigError("keep_alive is NaN; give a duration such as '5m' or a number of seconds")
    return math.inf if seconds < 0 else seconds
