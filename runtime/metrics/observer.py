"""RuntimeMetrics: the runtime's events (runtime.core.events) turned into counters and histograms.

Each event costs a few microseconds: the labelled children are bound once per runtime. The
per-token event (``inter_token``) only appends to a queue; the queue goes into the histogram
at the next step, request end or scrape, equal values at once (a step's tokens mostly share one ITL).
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING, Any

from runtime.core.admission import PRIORITY_LABELS, UNNAMED_TENANT_LABELS
from runtime.core.events import RejectReason, ResizeDirection, RestartedActor
from runtime.core.messages import DoneReason, RequestStats
from runtime.core.records import EmbeddingBatchReport, ResizeReason, RuntimeStatus, StepReport
from runtime.metrics.families import (
    ACTORS,
    FAILURE_REASONS,
    REJECT_REASONS,
    RESIZE_DIRECTIONS,
    RESIZE_REASONS,
    Families,
    failure_reason,
    families_for,
)

if TYPE_CHECKING:
    from runtime.metrics.source import StatusSource

__all__ = ["RuntimeMetrics"]


def observe_many(histogram: Any, value: float, count: int) -> None:
    """``histogram.observe(value)`` done ``count`` times, in one pass.

    prometheus-client has no weighted observe; this adds to the bucket ``observe`` would pick
    (the first upper bound >= ``value``) and to the sum, or falls back to ``count`` observes
    if its internals ever change.
    """
    buckets, bounds, total = (getattr(histogram, a, None) for a in ("_buckets", "_upper_bounds", "_sum"))
    if buckets is None or bounds is None or total is None:
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    buckets[bisect_left(bounds, value)].inc(count)


class _Series:
    """One model's children of the families, bound once.

    Every label set we know of is made here, so each series exists, at 0, before its first event
    (``rate`` and ``increase`` then see the first one, and dashboards show 0, not "no data").
    """

    def __init__(self, f: Families, model: str) -> None:
        self.f, self.model, m = f, model, model
        outcomes = [("completed", "stop"), ("completed", "length"), ("cancelled", "cancel")]
        outcomes += [("failed", r) for r in FAILURE_REASONS] + [("rejected", r) for r in REJECT_REASONS]
        self.requests = {(o, r): f.requests.labels(m, o, r) for o, r in outcomes}
        for actor in ACTORS:
            f.restarts.labels(m, actor)
        for direction in RESIZE_DIRECTIONS:
            for reason in RESIZE_REASONS:
                f.resizes.labels(m, direction, reason)
                f.resize_failures.labels(m, direction, reason)
        self.prompt_tokens = f.prompt_tokens.labels(m)
        self.prompt_tokens_cached = f.prompt_tokens_cached.labels(m)
        self.generation_tokens = f.generation_tokens.labels(m)
        self.steps = f.steps.labels(m)
        self.prefill_tokens = f.step_tokens.labels(m, "prefill")
        self.decode_tokens = f.step_tokens.labels(m, "decode")
        self.ttft = f.ttft.labels(m)
        self.itl = f.itl.labels(m)
        self.e2e = f.e2e.labels(m)
        self.queue = f.queue.labels(m)
        # Bound at 0 for requests that name no tenant or one beyond metrics_tenants: a series
        # born at its first request has no 0 before it, and ``rate`` misses that increase.
        self.queue_wait: dict[tuple[str, str], Any] = {
            (p, t): f.queue_wait.labels(m, p, t) for p in PRIORITY_LABELS for t in UNNAMED_TENANT_LABELS
        }
        self.prediction_error = f.prediction_error.labels(m)
        self.prefill = f.prefill.labels(m)
        self.decode = f.decode.labels(m)
        self.request_prompt = f.request_prompt.labels(m)
        self.request_generation = f.request_generation.labels(m)
        self.step_sequences = f.step_sequences.labels(m)
        self.step_seconds = f.step_seconds.labels(m)
        self.resize_pause = f.resize_pause.labels(m)
        self.embedding_requests = {o: f.embedding_requests.labels(m, o) for o in ("completed", "failed")}
        self.embeddings = f.embeddings.labels(m)
        self.embedding_tokens = f.embedding_tokens.labels(m)
        self.embedding_batches = f.embedding_batches.labels(m)


class RuntimeMetrics:
    """The metrics of one Runtime (a StatusSource) on ``rt.registry``: an Observer (runtime.core.events) for the
    counters and histograms, and an entry in the registry's collector for the gauges.

    The Runtime makes one when it is entered; a host never needs to. The ``model`` label is
    ``rt.status().model``, bound once the weights are loaded (a request refused while they load
    is counted under the configured model: ``default`` or the path). The request histograms
    take completed requests (done_reason stop or length); the token counters take every request
    that ran, cancelled ones included.

    :raises ValueError: if ``rt.registry`` already holds another metric of one of our names.
    """

    def __init__(self, rt: StatusSource) -> None:
        self._f = families_for(rt.registry)
        self._rt = weakref.ref(rt)
        self._s: _Series | None = None
        self._itl: deque[float] = deque()
        self._f.gauges.add(self)

    def runtime(self) -> StatusSource | None:
        """The runtime these metrics are of (None once it is garbage)."""
        return self._rt()

    def collecting(self, status: RuntimeStatus) -> None:
        """Bind the series when the registry is collected and the runtime is ready, so that they
        are scraped at 0 before its first request (``rate`` then sees every increase)."""
        if self._s is None and status.state != "loading":
            self._s = _Series(self._f, status.model)
        self._observe_itl()

    def _series(self) -> _Series | None:
        """The bound series; None while the weights load (the model's name is not known yet)."""
        if self._s is None and (rt := self._rt()) is not None:
            self.collecting(rt.status())
        return self._s

    def request_admitted(self) -> None:
        """Nothing to count: the admitted are the finished plus those queued or in a slot."""

    def request_rejected(self, reason: RejectReason) -> None:
        """Count a request refused before admission."""
        s = self._s or self._series()
        if s is not None:
            s.requests["rejected", reason].inc()
        elif (rt := self._rt()) is not None:
            self._f.requests.labels(rt.status().model, "rejected", reason).inc()

    def request_started(
        self, priority: str, tenant: str, wait_s: float, prediction_error_s: float | None
    ) -> None:
        """Observe a request's wait in the queue (by its bounded labels) and how far its
        predicted start was off."""
        s = self._s or self._series()
        if s is None:
            return
        child = s.queue_wait.get((priority, tenant))
        if child is None:
            child = s.queue_wait[priority, tenant] = s.f.queue_wait.labels(s.model, priority, tenant)
        child.observe(wait_s)
        if prediction_error_s is not None:
            s.prediction_error.observe(prediction_error_s)

    def request_finished(
        self, reason: DoneReason, stats: RequestStats | None, error: BaseException | None
    ) -> None:
        """Count the request by outcome and its tokens; observe a completed one's latencies."""
        s = self._s or self._series()
        if s is None:
            return
        self._observe_itl()  # this request's last latencies are in the queue by now
        completed = reason == "stop" or reason == "length"
        if completed:
            s.requests["completed", reason].inc()
        elif reason == "cancel":
            s.requests["cancelled", "cancel"].inc()
        else:
            s.requests["failed", failure_reason(error)].inc()
        if stats is None:
            return
        s.prompt_tokens.inc(stats.prompt_tokens)
        s.prompt_tokens_cached.inc(stats.prompt_tokens_cached)
        s.generation_tokens.inc(stats.completion_tokens)
        if not completed:
            return
        s.queue.observe(stats.queue_duration_ns / 1e9)
        s.prefill.observe(stats.prefill_duration_ns / 1e9)
        s.decode.observe(stats.decode_duration_ns / 1e9)
        s.e2e.observe(stats.total_duration_ns / 1e9)
        if stats.time_to_first_token_ns is not None:
            s.ttft.observe(stats.time_to_first_token_ns / 1e9)
        s.request_prompt.observe(stats.prompt_tokens)
        s.request_generation.observe(stats.completion_tokens)

    def inter_token(self, seconds: float) -> None:
        """Queue one inter-token latency (seconds) for the histogram."""
        self._itl.append(seconds)

    def _observe_itl(self) -> None:
        """Put the queued latencies into the histogram, each distinct value once (deque pops
        are atomic, so a scrape in another thread and the event loop can both do this)."""
        s = self._s
        if s is None:
            return  # not bound yet: they wait for the series
        counts: dict[float, int] = {}
        try:
            while True:
                value = self._itl.popleft()
                counts[value] = counts.get(value, 0) + 1
        except IndexError:
            pass
        for value, count in counts.items():
            observe_many(s.itl, value, count)

    def step(self, report: StepReport) -> None:
        """Count a decode step and its prefill and decode tokens; observe its sequences and seconds."""
        s = self._s or self._series()
        if s is None:
            return
        s.steps.inc()
        s.prefill_tokens.inc(report.n_prompt_tokens)
        s.decode_tokens.inc(report.n_tokens - report.n_prompt_tokens)
        s.step_sequences.observe(report.n_sequences)
        s.step_seconds.observe(report.seconds)
        self._observe_itl()

    def restart(self, actor: RestartedActor) -> None:
        """Count an actor restart."""
        s = self._s or self._series()
        if s is not None:
            s.f.restarts.labels(s.model, actor).inc()

    def resize(self, direction: ResizeDirection, reason: ResizeReason, pause_s: float) -> None:
        """Count a change of the slot count and observe its pause (seconds no step ran)."""
        s = self._s or self._series()
        if s is not None:
            s.f.resizes.labels(s.model, direction, reason).inc()
            s.resize_pause.observe(pause_s)

    def resize_failed(self, direction: ResizeDirection, reason: ResizeReason) -> None:
        """Count a resize whose new context could not be built."""
        s = self._s or self._series()
        if s is not None:
            s.f.resize_failures.labels(s.model, direction, reason).inc()

    def embedding_batch(self, report: EmbeddingBatchReport) -> None:
        """Count an embedding decode, its inputs and their tokens."""
        s = self._s or self._series()
        if s is not None:
            s.embedding_batches.inc()
            s.embeddings.inc(report.n_inputs)
            s.embedding_tokens.inc(report.n_tokens)

    def embedding_finished(self, inputs: int, tokens: int, error: BaseException | None) -> None:
        """Count an embedding call by outcome."""
        s = self._s or self._series()
        if s is not None:
            s.embedding_requests["completed" if error is None else "failed"].inc()
