"""The counter and histogram families, made once per registry and shared by its runtimes.

Every family has a ``model`` label first. Names follow Prometheus conventions (base units,
``_seconds``, ``_total`` on counters) and vLLM's names where we measure the same thing
(``time_to_first_token_seconds``, ``inter_token_latency_seconds``, ``e2e_request_latency_seconds``,
``request_queue_time_seconds``, ...).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from runtime.core.errors import (
    ContextOverflowError,
    GenerationError,
    InvalidRequestError,
    RuntimeClosedError,
    RuntimeFailedError,
    SlotFailedError,
)
from runtime.core.events import RejectReason, ResizeDirection, RestartedActor
from runtime.metrics import buckets
from runtime.metrics.gauges import Gauges

__all__ = [
    "ACTORS",
    "FAILURE_REASONS",
    "REJECT_REASONS",
    "RESIZE_DIRECTIONS",
    "RESIZE_REASONS",
    "Families",
    "failure_reason",
    "families_for",
]

REJECT_REASONS: tuple[RejectReason, ...] = (
    "queue_full",
    "tenant_cap",
    "deadline",
    "invalid",
    "closed",
    "failed",
)
"""The ``reason`` of ``outcome="rejected"``: why admission refused the request."""
FAILURE_REASONS = (
    "context_overflow", "invalid", "slot_failed", "generation", "runtime_failed", "runtime_closed", "other",
)  # fmt: skip
"""The ``reason`` of ``outcome="failed"``: the kind of error that failed an admitted request."""
ACTORS: tuple[RestartedActor, ...] = ("slot", "model")
RESIZE_DIRECTIONS: tuple[ResizeDirection, ...] = ("grow", "shrink")
RESIZE_REASONS = ("memory_low", "memory_available", "manual", "startup")
"""Resize reasons whose series exist (at 0) from the start; any other appears when first used."""

_FAILURES: tuple[tuple[type[BaseException], str], ...] = (
    (ContextOverflowError, "context_overflow"),
    (InvalidRequestError, "invalid"),
    (SlotFailedError, "slot_failed"),
    (GenerationError, "generation"),
    (RuntimeFailedError, "runtime_failed"),
    (RuntimeClosedError, "runtime_closed"),
)


def failure_reason(error: BaseException | None) -> str:
    """The ``reason`` label (one of FAILURE_REASONS) of a request that failed with ``error``."""
    for kind, reason in _FAILURES:
        if isinstance(error, kind):
            return reason
    return "other"


class Families:
    """The counters and histograms of one registry, and its gauge collector.

    :raises ValueError: if the registry already holds another metric of one of these names.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        # The gauge collector first: collecting it binds the series of newly ready runtimes
        # (at 0), so the counters and histograms collected after it already show them.
        self.gauges = Gauges()
        registry.register(self.gauges)

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, ("model", *labels), registry=registry)

        def histogram(name: str, doc: str, edges: Iterable[float]) -> Histogram:
            return Histogram(name, doc, ("model",), buckets=tuple(edges), registry=registry)

        self.requests = counter(
            "slotserve_requests_total",
            "Requests by outcome (completed, cancelled, failed, rejected) and reason.",
            "outcome", "reason",
        )  # fmt: skip
        self.prompt_tokens = counter("slotserve_prompt_tokens_total", "Prompt tokens of requests that ran.")
        self.prompt_tokens_cached = counter(
            "slotserve_prompt_tokens_cached_total",
            "Prompt tokens served from a slot's reused prefix (KV cells kept, not computed again).",
        )
        self.generation_tokens = counter("slotserve_generation_tokens_total", "Tokens generated.")
        self.steps = counter("slotserve_steps_total", "Batched decode steps.")
        self.step_tokens = counter(
            "slotserve_step_tokens_total", "Tokens decoded in steps, by phase (prefill, decode).", "phase"
        )
        self.restarts = counter(
            "slotserve_actor_restarts_total", "Actor restarts after a failure, by actor.", "actor"
        )
        self.resizes = counter(
            "slotserve_slot_resizes_total",
            "Changes of the effective slot count, by direction (grow, shrink) and reason.",
            "direction", "reason",
        )  # fmt: skip
        self.resize_failures = counter(
            "slotserve_resize_failures_total",
            "Resizes whose new context could not be built (the old count serves on), by direction and reason.",
            "direction", "reason",
        )  # fmt: skip
        self.embedding_requests = counter(
            "slotserve_embedding_requests_total",
            "Embedding calls (rt.embed, /api/embed, /v1/embeddings) by outcome (completed, failed).",
            "outcome",
        )
        self.embeddings = counter("slotserve_embeddings_total", "Inputs embedded (one vector each).")
        self.embedding_tokens = counter("slotserve_embedding_tokens_total", "Input tokens embedded.")
        self.embedding_batches = counter(
            "slotserve_embedding_batches_total", "Embedding decodes (each carries every input waiting)."
        )
        self.ttft = histogram(
            "slotserve_time_to_first_token_seconds",
            "Time to first token (TTFT): admission to first token, of completed requests.",
            buckets.FIRST_TOKEN_SECONDS,
        )
        self.itl = histogram(
            "slotserve_inter_token_latency_seconds",
            "Inter-token latency (ITL): time between two tokens of one request.",
            buckets.STEP_SECONDS,
        )
        self.e2e = histogram(
            "slotserve_e2e_request_latency_seconds",
            "End-to-end latency: admission to last token, of completed requests.",
            buckets.REQUEST_SECONDS,
        )
        self.queue = histogram(
            "slotserve_request_queue_time_seconds",
            "Time a completed request waited in the mailbox.",
            buckets.QUEUE_SECONDS,
        )
        self.queue_wait = Histogram(
            "slotserve_queue_wait_seconds",
            "Time a request waited in the mailbox before a slot took it, by priority (high, default, low) "
            "and tenant (those metrics_tenants names; the rest: other).",
            ("model", "priority", "tenant"), buckets=buckets.QUEUE_SECONDS, registry=registry,
        )  # fmt: skip
        self.prediction_error = histogram(
            "slotserve_queue_prediction_error_seconds",
            "How far a waiting request's predicted start was from its actual start (absolute).",
            buckets.QUEUE_SECONDS,
        )
        self.prefill = histogram(
            "slotserve_request_prefill_time_seconds",
            "Slot pick-up to first token (tokenizing and prefill), of completed requests.",
            buckets.FIRST_TOKEN_SECONDS,
        )
        self.decode = histogram(
            "slotserve_request_decode_time_seconds",
            "First token to last token, of completed requests.",
            buckets.REQUEST_SECONDS,
        )
        self.request_prompt = histogram(
            "slotserve_request_prompt_tokens", "Prompt tokens per completed request.", buckets.TOKENS
        )
        self.request_generation = histogram(
            "slotserve_request_generation_tokens", "Generated tokens per completed request.", buckets.TOKENS
        )
        self.step_sequences = histogram(
            "slotserve_step_sequences", "Sequences in one decode step.", buckets.SEQUENCES
        )
        self.step_seconds = histogram(
            "slotserve_step_duration_seconds", "Duration of one decode step.", buckets.STEP_SECONDS
        )
        self.resize_pause = histogram(
            "slotserve_resize_pause_seconds",
            "Time no step could run while a resize replaced the context.",
            buckets.RESIZE_PAUSE_SECONDS,
        )


_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, Families] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def families_for(registry: CollectorRegistry) -> Families:
    """The families on ``registry``, made on first use.

    :raises ValueError: if the registry already holds another metric of one of our names.
    """
    with _LOCK:
        families = _FAMILIES.get(registry)
        if families is None:
            families = _FAMILIES[registry] = Families(registry)
        return families
