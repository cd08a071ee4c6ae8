"""Every statistics() record and the runtime's status: frozen, typed msgspec Structs.

The actors and the mailbox make these; ``status()``, the metrics and the HTTP server read them.
Nothing that reads a record reaches into the object that made it. Sizes are in bytes, times in
seconds (``_s``), counts in requests, tokens or steps as named.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "DeviceMemory",
    "EmbeddingBatchReport",
    "EmbeddingStatistics",
    "HostCacheStatistics",
    "MailboxStatistics",
    "MemoryReading",
    "MemorySource",
    "ModelStatistics",
    "PlacementStatistics",
    "PreemptionStatistics",
    "QueueDepth",
    "QueuedRequest",
    "ResizeReason",
    "ResizeRecord",
    "RuntimeState",
    "RuntimeStatistics",
    "RuntimeStatus",
    "SlotStatistics",
    "StepReport",
    "SupervisorStatistics",
]

RuntimeState = Literal["loading", "ready", "draining", "failed", "closed"]
MemorySource = Literal["nvml", "host", "cgroup", "scripted"]
ResizeReason = Literal["manual", "memory_low", "memory_available", "startup"]


class DeviceMemory(msgspec.Struct, frozen=True, kw_only=True):
    """One device's memory as read; sizes in bytes, None where it could not be read (unknown,
    never zero)."""

    device: str
    """``gpu0``, ``gpu1``, ... (numbered as CUDA and llama.cpp number the visible GPUs), ``host``
    or ``scripted``."""
    name: str
    """What the device is: NVML's name (``NVIDIA H200``), ``host``, or the cgroup's path."""
    total_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    kv_share: float = 1.0
    """Of each slot's KV cache, the share this device holds (0: it holds weights only)."""


class MemoryReading(msgspec.Struct, frozen=True, kw_only=True):
    """Memory of the devices that hold the model at one time; sizes in bytes, ``time_s`` on the
    monotonic clock.

    The sizes are the bounding device's, scaled to the whole KV cache: of the devices that hold
    KV, the one with the least free memory for its share (free / kv_share), its figures divided
    by that share. One device reads as itself; a model split evenly over two GPUs reads twice the
    tighter GPU's figures. They are None when a device holding KV could not be read: the tightest
    may be the unknown one. ``devices`` has each device's own figures.
    """

    source: MemorySource
    device: str
    """The bounding device (or the first, when unknown)."""
    total_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    time_s: float
    devices: tuple[DeviceMemory, ...] = ()


class MailboxStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Queue depth and capacity (requests), and admission counts since start."""

    depth: int
    capacity: int
    admitted: int
    rejected: int
    closed: bool


class StepReport(msgspec.Struct, frozen=True, kw_only=True):
    """One decode step as the observers see it (:meth:`runtime.core.events.Observer.step`)."""

    n_tokens: int
    """Tokens in the batch."""
    n_sequences: int
    """Sequences with tokens in the batch."""
    n_prompt_tokens: int
    """Of ``n_tokens``, prompt (prefill) tokens; the rest are one per decoding sequence."""
    seconds: float
    """From queueing the decode to its result."""


class ModelStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Step counts and what they carried."""

    steps: int
    tokens_decoded: int
    tokens_sampled: int
    sequences_active: int
    last_step_sequences: int
    step_seconds_total: float
    failed_steps: int
    steps_by_sequences: dict[int, int]
    """Number of sequences in a step -> how many steps carried that many."""
    pending_trims: int
    """KV removals waiting for the next step."""
    kv_cells_active: int
    """KV cells written so far by the sequences being served (prompt and generated tokens)."""
    stepping: bool
    """Whether the step loop is busy now (applying commands, planning, decoding, or handing a
    step's tokens over), or has commands or tokens not yet taken."""
    prefill_capped_steps: int = 0
    """Steps whose prompt tokens the prefill budget cut (actors.budget)."""
    host_cache: HostCacheStatistics | None = None
    """The host-RAM prompt cache (actors.host_cache); None when it is off."""
    preemption: PreemptionStatistics | None = None
    """Sequences parked and resumed (actors.preemption)."""


class HostCacheStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The host-RAM prompt cache: its bound and size in bytes, and what it served."""

    bound_bytes: int
    held_bytes: int
    entries: int
    hits: int
    """Prompts whose prefix was restored from the cache."""
    misses: int
    """Prompts no entry served better than their slot's cells."""
    tokens_saved: int
    """Prompt tokens restored from the cache instead of evaluated."""
    evictions: int
    """Entries dropped, least recently used first, to make room."""


class PreemptionStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Preemption by snapshot: sequences parked to host memory and resumed, and what is parked now."""

    preemptions: int
    """Running sequences parked so that their slot served another request."""
    resumes: int
    """Parked sequences resumed where they were."""
    failed_resumes: int
    """Parked sequences whose state could not be restored (their request failed)."""
    parked: int
    """Sequences parked now (at most the slot count)."""
    parked_bytes: int
    """Host memory their saved states take."""


class SlotStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """One slot: whether it is busy, and the prompt tokens its sequence keeps cached."""

    slot: int
    busy: bool
    served: int
    cached_tokens: int


class PlacementStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Which idle slot took each request (actors.placement): the one whose cells shared most of
    its prompt (``by_prefix``), or the least recently used one; ``idle``: slots waiting now."""

    idle: int = 0
    by_prefix: int = 0
    least_recently_used: int = 0


class ResizeRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One resize: slot counts before and after, why, and how long no step ran (seconds)."""

    from_slots: int
    to_slots: int
    reason: ResizeReason
    pause_s: float
    drain_s: float
    """Seconds the retiring slots took to finish their requests (shrinking only)."""
    carried_bytes: int
    error: str | None = None
    """Why it failed, if it did: then ``to_slots`` is the count that serves on (``from_slots``)."""


class SupervisorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Slot counts, restarts by actor, resizes, the last memory reading, and any failure."""

    slots_effective: int
    slots_target: int
    slots_busy: int
    slot_restarts: int
    model_restarts: int
    resizes: tuple[ResizeRecord, ...]
    memory: MemoryReading | None
    failure: str | None
    slots: tuple[SlotStatistics, ...]
    placement: PlacementStatistics = PlacementStatistics()


class EmbeddingBatchReport(msgspec.Struct, frozen=True, kw_only=True):
    """One embedding decode: inputs (sequences) and tokens in it, and its time in seconds."""

    n_inputs: int
    n_tokens: int
    seconds: float


class EmbeddingStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The Embedder's counts since start: decodes (batches), inputs and tokens embedded."""

    batches: int = 0
    inputs: int = 0
    tokens: int = 0
    seconds_total: float = 0.0
    largest_batch: int = 0
    """Most inputs one decode carried."""
    waiting: int = 0
    """Inputs waiting for a decode now."""
    failed_batches: int = 0


class RuntimeStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The statistics() records of the mailbox, the ModelActor, the Supervisor and the Embedder."""

    mailbox: MailboxStatistics
    model: ModelStatistics
    supervisor: SupervisorStatistics
    embeddings: EmbeddingStatistics = EmbeddingStatistics()


class QueuedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request waiting in the mailbox (``status().queue``, in the order it would be served)."""

    position: int
    """Requests the queue would give a slot before this one (0: it is next)."""
    priority: int
    tenant: str
    waited_s: float
    """Seconds since it was admitted."""
    predicted_start_s: float | None
    """Seconds from now until a slot is predicted to take it; None before a step was measured."""


class QueueDepth(msgspec.Struct, frozen=True, kw_only=True):
    """Requests waiting of one priority label (high, default, low) and tenant label."""

    priority: str
    tenant: str
    depth: int


class RuntimeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the runtime (``rt.status()``); sizes in bytes, counts in requests."""

    state: RuntimeState
    failure: str | None
    model: str
    backend: str
    weights_bytes: int
    kv_bytes_per_slot: int
    n_ctx_per_slot: int
    slots_configured: int
    """The slots asked for (with ``auto``: the count chosen at start)."""
    slots_auto: bool
    slots_effective: int
    """The slots running now."""
    slots_target: int
    """The slots the Supervisor is moving to (differs from effective during a resize)."""
    slots_busy: int
    queue_depth: int
    queue_capacity: int
    requests_admitted: int
    requests_in_flight: int
    """Admitted and not yet ended: queued, being served, or waiting to be retried."""
    requests_completed: int
    requests_cancelled: int
    requests_failed: int
    requests_rejected: int
    restarts: int
    steps: int
    kv_cache_type: str
    resizes: int
    last_resize: ResizeRecord | None
    memory: MemoryReading | None
    """The last reading the Supervisor took; ``memory.devices`` has each device's figures."""
    batched: bool = True
    """Whether a step decodes every busy slot together (False: one after another; ctransformers)."""
    model_instances: int = 1
    """Library instances of the model: 1 shared context, or one per slot (ctransformers)."""
    weights_resident_bytes: int = 0
    """weights_bytes times the copies held: once where instances share them, else per instance."""
    queue: tuple[QueuedRequest, ...] = ()
    """The first 100 waiting requests in the order the queue would serve them."""
    queue_depths: tuple[QueueDepth, ...] = ()
    """Waiting requests by priority and tenant label (tenants beyond metrics_tenants: other)."""
