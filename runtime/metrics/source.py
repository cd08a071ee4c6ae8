"""What the metrics read: a small protocol that a Runtime satisfies, so that this layer knows
records (runtime.core.records), not the Runtime class."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry

from runtime.core.records import RuntimeStatistics, RuntimeStatus

__all__ = ["RegistrySource", "StatusSource"]


class RegistrySource(Protocol):
    """What /metrics serves: a registry (a runtime's, or one that gathers replicas' series)."""

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus-client registry its metrics live on."""
        ...


class StatusSource(RegistrySource, Protocol):
    """A runtime as the metrics see it."""

    @property
    def load_seconds(self) -> float:
        """Seconds the weights took to load."""
        ...

    def status(self) -> RuntimeStatus:
        """A snapshot of the runtime."""
        ...

    def statistics(self) -> RuntimeStatistics:
        """The actors' records (only once it is no longer loading)."""
        ...
