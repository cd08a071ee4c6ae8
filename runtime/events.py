"""What the runtime tells observers (the metrics layer) as things happen.

Counts and histograms come from these events; gauges are read from ``statistics()`` records
when scraped. Every method is called on the event loop and must return in microseconds.
"""

from __future__ import annotations

from typing import Literal, Protocol

from runtime.messages import DoneReason, RequestStats

__all__ = ["Observer", "Observers", "RejectReason", "ResizeDirection", "RestartedActor"]

RejectReason = Literal["queue_full", "invalid", "closed", "failed"]
RestartedActor = Literal["slot", "model"]
ResizeDirection = Literal["grow", "shrink"]


class Observer(Protocol):
    """Receives runtime events; implement only what you need by subclassing Observers."""

    def request_admitted(self) -> None:
        """A request entered the mailbox."""

    def request_rejected(self, reason: RejectReason) -> None:
        """A request was refused before admission."""

    def request_finished(
        self, reason: DoneReason, stats: RequestStats | None, error: BaseException | None
    ) -> None:
        """An admitted request ended; ``stats`` is None if it failed before it started."""

    def inter_token(self, seconds: float) -> None:
        """Seconds between two consecutive tokens of one request (ITL)."""

    def step(self, n_tokens: int, n_sequences: int, n_prompt_tokens: int, seconds: float) -> None:
        """One decode step: tokens and sequences in the batch, of which prompt tokens; its time."""

    def restart(self, actor: RestartedActor) -> None:
        """An actor was restarted after a failure."""

    def resize(self, direction: ResizeDirection, reason: str, pause_s: float) -> None:
        """The slot count changed (``reason``: manual, memory_low, memory_available, startup)."""


class Observers:
    """Fans events out to any number of observers; with none, every call is a no-op."""

    def __init__(self, *observers: Observer) -> None:
        self._observers = list(observers)

    def add(self, observer: Observer) -> None:
        """Send events to ``observer`` too."""
        self._observers.append(observer)

    def request_admitted(self) -> None:
        for o in self._observers:
            o.request_admitted()

    def request_rejected(self, reason: RejectReason) -> None:
        for o in self._observers:
            o.request_rejected(reason)

    def request_finished(
        self, reason: DoneReason, stats: RequestStats | None, error: BaseException | None
    ) -> None:
        for o in self._observers:
            o.request_finished(reason, stats, error)

    def inter_token(self, seconds: float) -> None:
        for o in self._observers:
            o.inter_token(seconds)

    def step(self, n_tokens: int, n_sequences: int, n_prompt_tokens: int, seconds: float) -> None:
        for o in self._observers:
            o.step(n_tokens, n_sequences, n_prompt_tokens, seconds)

    def restart(self, actor: RestartedActor) -> None:
        for o in self._observers:
            o.restart(actor)

    def resize(self, direction: ResizeDirection, reason: str, pause_s: float) -> None:
        for o in self._observers:
            o.resize(direction, reason, pause_s)
