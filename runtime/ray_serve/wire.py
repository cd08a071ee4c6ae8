"""What crosses between the deployments (plain records, no Ray): the Engine's options, its
routing figures, its reports to the Board, and errors as data.

Errors travel as :class:`WireError` items of a stream, not as raised exceptions: ours take
arguments that pickling would lose (ContextOverflowError's counts), and an error the runtime
raised on purpose must not read like a replica that died (which Ray raises).
"""

from __future__ import annotations

import msgspec

from runtime.core import errors
from runtime.core.config import RuntimeConfig
from runtime.core.records import RuntimeStatus
from runtime.server.served import ReplicaStatus

__all__ = [
    "EngineOptions",
    "ReplicaReport",
    "RoutingStats",
    "WireError",
    "error_from_wire",
    "error_to_wire",
    "replica_capacity",
]


class EngineOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How every Engine replica builds its Runtime."""

    config: RuntimeConfig
    fake_step_delay_s: float = 0.0
    """With ``config.backend == "fake"``: seconds each fake step sleeps (tests, the benchmark)."""
    fake_fault_prompts: tuple[str, ...] = ()
    """With ``config.backend == "fake"``: prompts whose sequence fails (FakeBackend's faults)."""
    report_period_s: float = 1.0
    """How often a replica sends its figures and metrics to the Board."""


def replica_capacity(config: RuntimeConfig) -> int:
    """Requests one replica holds at most: its most slots plus its mailbox (Serve's
    ``max_ongoing_requests``, so that the mailbox stays inside the replica)."""
    most_slots = config.max_slots if config.slots == "auto" else config.slots
    return most_slots + config.max_queue


class RoutingStats(msgspec.Struct, frozen=True, kw_only=True):
    """What a replica's ``record_routing_stats`` reports (as a dict), for the router."""

    free_slots: int
    queue_depth: int
    queue_capacity: int
    slots: int
    memory_pressure: bool
    """The Supervisor is below the slots configured, or shrinking: memory is short."""
    ready: bool

    @classmethod
    def of(cls, status: RuntimeStatus) -> RoutingStats:
        """The figures of ``status``."""
        pressure = (
            status.slots_effective < status.slots_configured or status.slots_target < status.slots_effective
        )
        return cls(
            free_slots=max(0, status.slots_effective - status.slots_busy),
            queue_depth=status.queue_depth,
            queue_capacity=status.queue_capacity,
            slots=status.slots_effective,
            memory_pressure=pressure,
            ready=status.state == "ready",
        )


class ReplicaReport(msgspec.Struct, frozen=True, kw_only=True):
    """One replica's figures, sent to the Board every ``report_period_s``."""

    replica: ReplicaStatus
    status: RuntimeStatus
    metrics: bytes
    """Its registry in the Prometheus text format."""
    at_s: float
    """When it was taken (time.time(), seconds)."""


class WireError(msgspec.Struct, frozen=True, kw_only=True):
    """An exception as data: its class name (of runtime.core.errors), message and attributes."""

    kind: str
    message: str
    fields: dict[str, object] = msgspec.field(default_factory=dict)


def error_to_wire(exc: BaseException) -> WireError:
    """``exc`` as a WireError (one not of ours becomes a GenerationError naming its type)."""
    kind = type(exc).__name__
    if not isinstance(exc, errors.SlotserveError) or getattr(errors, kind, None) is not type(exc):
        return WireError(kind="GenerationError", message=f"{kind}: {exc}")
    fields: dict[str, object] = {
        k: v for k, v in vars(exc).items() if isinstance(v, int | float | str | None)
    }
    return WireError(kind=kind, message=str(exc), fields=fields)


def error_from_wire(error: WireError) -> errors.SlotserveError:
    """The exception ``error`` describes, of its own class, message and attributes."""
    cls = getattr(errors, error.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.SlotserveError)):
        cls = errors.GenerationError
    exc = cls.__new__(cls)
    Exception.__init__(exc, error.message)
    vars(exc).update(error.fields)
    return exc
