"""Gauges read when the registry is collected, from ``rt.status()`` and ``rt.statistics()``.

Nothing counts these up and down as events happen, so they cannot drift: after a mass cancel
with no further traffic, the next scrape reads an empty queue and idle slots. A closed runtime
has no gauges. Collecting reads the runtimes' snapshots, which belong to the event loop: the
ASGI app (``metrics_app``) collects there; prometheus-client's threaded HTTP server would read
them from another thread, best effort.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from runtime.core.records import DeviceMemory, RuntimeStatus
    from runtime.metrics.source import StatusSource

__all__ = ["STATES", "GaugeSource", "Gauges"]


class GaugeSource(Protocol):
    """What the collector reads: a runtime (None once it is garbage), told of each reading."""

    def runtime(self) -> StatusSource | None:
        """The runtime to read, or None."""

    def collecting(self, status: RuntimeStatus) -> None:
        """Called with the runtime's status at each collection, before its families are read."""


STATES = ("loading", "ready", "draining", "failed")
"""The values of ``slotserve_runtime_state``'s ``state`` label."""

_PER_MODEL = {
    "slotserve_queue_depth": "Requests waiting in the mailbox.",
    "slotserve_queue_capacity": "Requests the mailbox holds at most (max_queue).",
    "slotserve_slots_configured": "Slots asked for (with slots=auto: the count chosen at start).",
    "slotserve_slots_effective": "Slots running now (fewer than configured when memory is short).",
    "slotserve_slots_target": "Slots the Supervisor is moving to (differs from effective during a resize).",
    "slotserve_slots_busy": "Slots serving a request.",
    "slotserve_model_weights_bytes": "Bytes of the loaded weights.",
    "slotserve_kv_cache_allocated_bytes": "KV cache bytes allocated: effective slots x KV bytes per slot.",
    "slotserve_prefix_cache_tokens": "Tokens (prompts and answers) idle slots keep in their sequences for prefix reuse.",
    "slotserve_kv_cache_used_bytes": "KV cache bytes holding tokens: cells of running sequences and kept prefixes.",
    "slotserve_model_load_duration_seconds": "Seconds the weights took to load.",
    "slotserve_host_cache_bytes": "Bytes of saved KV states the host-RAM prompt cache holds.",
    "slotserve_host_cache_bound_bytes": "Bytes the host-RAM prompt cache may hold (host_cache_bytes; 0: off).",
    "slotserve_parked_sequences": "Preempted requests parked in host memory, waiting to resume.",
    "slotserve_parked_bytes": "Host memory the parked requests' saved KV states take.",
}

_READ_COUNTERS = {
    "slotserve_host_cache_hits_total": "Prompts whose prefix was restored from the host-RAM prompt cache.",
    "slotserve_host_cache_misses_total": "Prompts the host-RAM prompt cache had nothing better for than their slot's cells.",
    "slotserve_host_cache_tokens_saved_total": "Prompt tokens restored from the host-RAM prompt cache instead of evaluated.",
    "slotserve_preemptions_total": "Running requests parked in host memory so that their slot served another (and resumed later).",
}
"""Counters read from the host cache's and the preemptions' own counts at each scrape (they only grow while the model is loaded)."""

_DEVICE_MEMORY: dict[str, tuple[str, Callable[[DeviceMemory], int | None]]] = {
    "slotserve_device_memory_free_bytes": (
        "Free memory of each device that holds the model (NVML GPU, or host), as the Supervisor last read it.",
        lambda d: d.free_bytes,
    ),
    "slotserve_device_memory_used_bytes": (
        "Used memory of each of those devices, as last read.",
        lambda d: d.used_bytes,
    ),
    "slotserve_device_memory_total_bytes": (
        "Total memory of each of those devices, as last read.",
        lambda d: d.total_bytes,
    ),
}
"""Family -> (help, the figure of a device it shows); a device read as unknown has no sample."""


@dataclass(slots=True)
class _Reading:
    """The gauges of one model label, summed over its runtimes on one registry."""

    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_PER_MODEL, 0.0))
    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_READ_COUNTERS, 0.0))
    devices: dict[str, DeviceMemory] = field(default_factory=dict)
    """device label -> its memory, as the Supervisor last read it."""
    queued: dict[tuple[str, str], int] = field(default_factory=dict)
    """(priority label, tenant label) -> requests waiting."""

    def add(self, rt: StatusSource, status: RuntimeStatus) -> None:
        if status.state in self.states:
            self.states[status.state] += 1
        cached = active = 0
        host = preemption = None
        if status.state != "loading":
            stats = rt.statistics()
            cached = sum(s.cached_tokens for s in stats.supervisor.slots)
            active = stats.model.kv_cells_active
            host, preemption = stats.model.host_cache, stats.model.preemption
        if preemption is not None:
            self.values["slotserve_parked_sequences"] += preemption.parked
            self.values["slotserve_parked_bytes"] += preemption.parked_bytes
            self.counts["slotserve_preemptions_total"] += preemption.preemptions
        if host is not None:
            self.values["slotserve_host_cache_bytes"] += host.held_bytes
            self.values["slotserve_host_cache_bound_bytes"] += host.bound_bytes
            self.counts["slotserve_host_cache_hits_total"] += host.hits
            self.counts["slotserve_host_cache_misses_total"] += host.misses
            self.counts["slotserve_host_cache_tokens_saved_total"] += host.tokens_saved
        bytes_per_cell = status.kv_bytes_per_slot / max(1, status.n_ctx_per_slot)
        values = {
            "slotserve_queue_depth": status.queue_depth,
            "slotserve_queue_capacity": status.queue_capacity,
            "slotserve_slots_configured": status.slots_configured,
            "slotserve_slots_effective": status.slots_effective,
            "slotserve_slots_target": status.slots_target,
            "slotserve_slots_busy": status.slots_busy,
            "slotserve_model_weights_bytes": status.weights_bytes,
            "slotserve_kv_cache_allocated_bytes": status.slots_effective * status.kv_bytes_per_slot,
            "slotserve_prefix_cache_tokens": cached,
            "slotserve_kv_cache_used_bytes": (cached + active) * bytes_per_cell,
        }
        for name, value in values.items():
            self.values[name] += value
        load = "slotserve_model_load_duration_seconds"
        self.values[load] = max(self.values[load], rt.load_seconds)
        if status.memory is not None:
            self.devices.update((d.device, d) for d in status.memory.devices)
        for depth in status.queue_depths:
            key = (depth.priority, depth.tenant)
            self.queued[key] = self.queued.get(key, 0) + depth.depth


class Gauges(Collector):
    """The gauge collector of one registry: reads every entered, unclosed runtime on it."""

    def __init__(self) -> None:
        self._sources: weakref.WeakSet[GaugeSource] = weakref.WeakSet()

    def add(self, source: GaugeSource) -> None:
        """Read ``source``'s runtime at every collection until it is closed (or garbage)."""
        self._sources.add(source)

    def describe(self) -> Iterable[Metric]:
        """The families without samples, so a registry can refuse a clashing name."""
        return list(_families({}))

    def collect(self) -> Iterable[Metric]:
        """Read every runtime now: one sample per model label and family."""
        readings: dict[str, _Reading] = {}
        for source in list(self._sources):
            rt = source.runtime()
            status = None if rt is None else rt.status()
            if rt is None or status is None or status.state == "closed":
                continue
            source.collecting(status)
            readings.setdefault(status.model, _Reading()).add(rt, status)
        return list(_families(readings))


def _families(readings: dict[str, _Reading]) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "slotserve_runtime_state",
        "Runtimes in each state (loading, ready, failed): 1 for the state a runtime is in.",
        labels=["model", "state"],
    )
    for model, r in readings.items():
        for name, count in r.states.items():
            state.add_metric([model, name], count)
    yield state
    for name, doc in _PER_MODEL.items():
        family = GaugeMetricFamily(name, doc, labels=["model"])
        for model, r in readings.items():
            family.add_metric([model], r.values[name])
        yield family
    for name, doc in _READ_COUNTERS.items():
        counter = CounterMetricFamily(name, doc, labels=["model"])
        for model, r in readings.items():
            counter.add_metric([model], r.counts[name])
        yield counter
    queued = GaugeMetricFamily(
        "slotserve_queue_requests",
        "Requests waiting in the mailbox by priority (high, default, low) and tenant (metrics_tenants; the rest: other).",
        labels=["model", "priority", "tenant"],
    )
    for model, r in readings.items():
        for (priority, tenant), n in sorted(r.queued.items()):
            queued.add_metric([model, priority, tenant], n)
    yield queued
    for name, (doc, figure) in _DEVICE_MEMORY.items():
        family = GaugeMetricFamily(name, doc, labels=["model", "device"])
        for model, r in readings.items():
            for device, memory in r.devices.items():
                if (value := figure(memory)) is not None:  # unknown: no sample, never 0
                    family.add_metric([model, device], value)
        yield family
