"""What the runtime tells observers (the metrics layer) as things happen.

Counts and histograms come from these events; gauges are read from ``statistics()`` records
when scraped. Every method is called on the event loop and must return in microseconds.

Observers are isolated here, in one place (trio does this for its instruments): an observer
that raises is logged once per event with its name, and nothing else changes: the request, its
slot and the runtime go on, and the other observers are still called.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any, Literal, Protocol

from runtime.core.messages import DoneReason, RequestStats
from runtime.core.records import EmbeddingBatchReport, ResizeReason, StepReport

__all__ = ["EVENTS", "Observer", "Observers", "RejectReason", "ResizeDirection", "RestartedActor"]

log = logging.getLogger("slotserve.events")

RejectReason = Literal["queue_full", "tenant_cap", "deadline", "invalid", "closed", "failed"]
RestartedActor = Literal["slot", "model"]
ResizeDirection = Literal["grow", "shrink"]


class Observer(Protocol):
    """Receives runtime events. An observer may define only the methods it needs: Observers
    calls each one an observer has."""

    def request_admitted(self) -> None:
        """A request entered the mailbox."""

    def request_rejected(self, reason: RejectReason) -> None:
        """A request was refused before admission."""

    def request_started(
        self, priority: str, tenant: str, wait_s: float, prediction_error_s: float | None
    ) -> None:
        """A slot took a request after ``wait_s`` seconds in the queue (labels bounded: priority
        high, default or low; the tenant or ``other``); the predicted start was
        ``prediction_error_s`` seconds off (None: nothing was predicted)."""

    def request_finished(
        self, reason: DoneReason, stats: RequestStats | None, error: BaseException | None
    ) -> None:
        """An admitted request ended; ``stats`` is None if it failed before it started."""

    def inter_token(self, seconds: float) -> None:
        """Seconds between two consecutive tokens of one request (ITL)."""

    def step(self, report: StepReport) -> None:
        """One decode step: tokens and sequences in the batch, of which prompt tokens; its time."""

    def restart(self, actor: RestartedActor) -> None:
        """An actor was restarted after a failure."""

    def resize(self, direction: ResizeDirection, reason: ResizeReason, pause_s: float) -> None:
        """The slot count changed (``reason``: manual, memory_low, memory_available, startup)."""

    def resize_failed(self, direction: ResizeDirection, reason: ResizeReason) -> None:
        """No context of the new slot count could be built; the old count serves on."""

    def embedding_batch(self, report: EmbeddingBatchReport) -> None:
        """One embedding decode: its inputs, tokens and seconds."""

    def embedding_finished(self, inputs: int, tokens: int, error: BaseException | None) -> None:
        """An ``rt.embed`` call ended: its inputs, the tokens embedded, and its error (None: done)."""


EVENTS = (
    "request_admitted", "request_rejected", "request_started", "request_finished", "inter_token", "step", "restart", "resize",
    "resize_failed", "embedding_batch", "embedding_finished",
)  # fmt: skip
"""The Observer methods, in the protocol's order."""


class Observers:
    """Fans events out to any number of observers; with none, every call is a no-op.

    Each event calls every observer that has the method; one that raises is logged (the first
    time for that observer and event, with both names) and skipped for this call only. An
    Observers among the observers (a model's holds its Runtime's; not a subclass, whose methods
    may be its own) is flattened: its observers, those added to it later too, are called from
    here in its place, not through a second fan-out for every event (one a token).
    """

    def __init__(self, *observers: object) -> None:
        self._handlers: dict[str, list[Callable[..., Any]]] = {event: [] for event in EVENTS}
        self._logged: set[tuple[int, str]] = set()
        self._inter_token = self._handlers["inter_token"]
        self._observers: list[object] = []
        self._into: weakref.WeakSet[Observers] = weakref.WeakSet()  # the Observers that flatten this one
        for o in observers:
            self.add(o)

    def add(self, observer: object) -> None:
        """Send events to ``observer`` too: each Observer method it has (any subset)."""
        self._observers.append(observer)
        if type(observer) is Observers:  # a subclass may override events: it is an observer
            observer._into.add(self)
            observer._logged |= self._logged  # one log for an observer and event, whichever fans out
            self._logged = observer._logged
        self._rebuild()

    def _rebuild(self) -> None:
        """Each event's handlers, in the order their observers were added (in place: the hot
        paths hold the lists)."""
        for event, handlers in self._handlers.items():
            flat: list[Callable[..., Any]] = []
            for o in self._observers:
                if type(o) is Observers:
                    flat += o._handlers[event]
                elif callable(handler := getattr(o, event, None)):
                    flat.append(handler)
            handlers[:] = flat
        for outer in list(self._into):
            outer._rebuild()

    def _emit(self, event: str, *args: Any) -> None:
        for handler in self._handlers[event]:
            try:
                handler(*args)
            except Exception:
                self._failed(handler, event)

    def _failed(self, handler: Callable[..., Any], event: str) -> None:
        owner = getattr(handler, "__self__", handler)
        key = (id(owner), event)
        if key not in self._logged:
            self._logged.add(key)
            log.exception(
                "observer %s failed in %s; the runtime goes on (later failures there are not logged)",
                type(owner).__qualname__, event,
            )  # fmt: skip

    def request_admitted(self) -> None:
        self._emit("request_admitted")

    def request_rejected(self, reason: RejectReason) -> None:
        self._emit("request_rejected", reason)

    def request_started(
        self, priority: str, tenant: str, wait_s: float, prediction_error_s: float | None
    ) -> None:
        self._emit("request_started", priority, tenant, wait_s, prediction_error_s)

    def request_finished(
        self, reason: DoneReason, stats: RequestStats | None, error: BaseException | None
    ) -> None:
        self._emit("request_finished", reason, stats, error)

    def inter_token(self, seconds: float) -> None:
        for handler in self._inter_token:  # once per token: no generic dispatch
            try:
                handler(seconds)
            except Exception:
                self._failed(handler, "inter_token")

    def step(self, report: StepReport) -> None:
        self._emit("step", report)

    def restart(self, actor: RestartedActor) -> None:
        self._emit("restart", actor)

    def resize(self, direction: ResizeDirection, reason: ResizeReason, pause_s: float) -> None:
        self._emit("resize", direction, reason, pause_s)

    def resize_failed(self, direction: ResizeDirection, reason: ResizeReason) -> None:
        self._emit("resize_failed", direction, reason)

    def embedding_batch(self, report: EmbeddingBatchReport) -> None:
        self._emit("embedding_batch", report)

    def embedding_finished(self, inputs: int, tokens: int, error: BaseException | None) -> None:
        self._emit("embedding_finished", inputs, tokens, error)
