"""Admission: a ticket into the mailbox by its request's priority and tenant, with a predicted
start and TTFT, refused at once when the prediction misses its deadline.

The Admission owns the mailbox (runtime.core.mailbox, ordered by runtime.core.fair_queue) and
the rates it predicts from (runtime.core.wait_predictor), which it measures itself: it is an
Observer of the steps, and the Runtime tells it when each request ends. Every refusal carries
``retry_after_s`` from the prediction: when the request ahead is predicted to start (room in
the queue, or in the tenant's share of it), or by how much a deadline was missed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

from runtime.core.config import RuntimeConfig
from runtime.core.errors import DeadlineUnmetError, QueueFullError, TenantQueueFullError
from runtime.core.events import Observers
from runtime.core.fair_queue import Held, Placement, QueuePolicy
from runtime.core.mailbox import Mailbox
from runtime.core.messages import ChatRequest, GenerateRequest, QueueEstimate, RequestStats
from runtime.core.preemption import Running, victim
from runtime.core.records import QueueDepth, QueuedRequest, StepReport
from runtime.core.ticket import Ticket
from runtime.core.wait_predictor import WaitPredictor, Work

__all__ = ["Admission", "priority_label", "prompt_chars"]

STATUS_QUEUE_LIMIT = 100
"""Queued requests listed one by one in ``status().queue`` (the first in the queue's order)."""


def prompt_chars(request: GenerateRequest | ChatRequest) -> int:
    """The characters of the request's prompt (a chat's contents, and a little per message)."""
    if isinstance(request, GenerateRequest):
        return len(request.prompt)
    return sum(len(m.content) + 12 for m in request.messages)


PRIORITY_LABELS = ("high", "default", "low")
"""The values of the metrics' ``priority`` label."""
UNNAMED_TENANT_LABELS = ("default", "other")
"""The metrics' ``tenant`` label of requests that name no tenant, and of those whose tenant
``metrics_tenants`` does not name."""


def priority_label(priority: int) -> str:
    """The metrics' ``priority`` label: ``high`` above 0, ``default`` at 0, ``low`` below."""
    return "high" if priority > 0 else "low" if priority < 0 else "default"


class Admission:
    """The mailbox and the prediction of each request's start.

    :param config: max_queue, the tenants' weights and caps, aging, the metrics' tenants.
    :param observers: told of each start (``request_started``).
    :param clock: seconds, monotonic.
    """

    def __init__(
        self, config: RuntimeConfig, observers: Observers, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.predictor = WaitPredictor()
        policy = QueuePolicy(
            weights=config.weights,
            tenant_max_queued=config.tenant_max_queued,
            tenant_max_slots=config.tenant_max_slots,
            aging_s=config.queue_aging_s or math.inf,
        )
        self.mailbox: Mailbox[Ticket] = Mailbox(config.max_queue, policy, on_take=self._taken, clock=clock)
        self._observers = observers
        self._clock = clock
        self._slots: Callable[[], int] = lambda: 1
        self._predicted: dict[int, float] = {}  # id(ticket) -> predicted start, clock seconds
        self._tenants = frozenset(t.strip() for t in config.metrics_tenants.split(",") if t.strip())

    def bind(self, slots: Callable[[], int]) -> None:
        """Read the effective slot count from ``slots`` (the Supervisor's, once it runs)."""
        self._slots = slots

    def tenant_label(self, tenant: str) -> str:
        """The metrics' ``tenant`` label: the tenant if ``metrics_tenants`` names it, else
        ``other`` (``default`` for requests that name none)."""
        none, other = UNNAMED_TENANT_LABELS
        if not tenant:
            return none
        return tenant if tenant in self._tenants else other

    # -- admission -----------------------------------------------------------------------------

    def admit_nowait(self, tickets: Sequence[Ticket]) -> QueueEstimate:
        """Queue ``tickets`` (one request, or its n choices) now, or refuse them all.

        :returns: where the (first) ticket stands and its predicted start, at admission.
        :raises DeadlineUnmetError: if its first token is predicted after its ``deadline_ms``.
        :raises TenantQueueFullError: if its tenant has ``tenant_max_queued`` requests waiting.
        :raises QueueFullError: if the mailbox is full.
        :raises RuntimeClosedError: if the mailbox is closed.
        """
        request = tickets[0].request
        estimates: list[QueueEstimate] = []
        try:
            self.mailbox.put_all_nowait(
                tickets, self._placement(request), check=self._check(tickets[0], estimates)
            )
        except QueueFullError as exc:
            self._refused(exc, request)
            raise
        self._expect(tickets[0], estimates[-1])
        self._make_room(tickets)
        return estimates[-1]

    async def admit(self, ticket: Ticket, timeout_s: float) -> QueueEstimate:
        """Queue ``ticket``, waiting up to ``timeout_s`` seconds for room; raises as
        :meth:`admit_nowait` (QueueFullError once the time is up)."""
        request = ticket.request
        estimates: list[QueueEstimate] = []
        try:
            await self.mailbox.put(
                ticket, timeout_s, self._placement(request), check=self._check(ticket, estimates)
            )
        except QueueFullError as exc:
            self._refused(exc, request)
            raise
        self._expect(ticket, estimates[-1])
        self._make_room([ticket])
        return estimates[-1]

    def _make_room(self, tickets: Sequence[Ticket]) -> None:
        """``tickets`` (a request, or its n choices) wait and every slot is busy: ask as many
        running requests as wait to give way (runtime.core.preemption; ``preemption`` on): of a
        lower priority first, else of a tenant over its share of the class's slots. A tenant
        at its slot cap could not take another's slot: only its own give way."""
        if not self.config.preemption:
            return
        queue = self.mailbox.queue
        waiting = [t for t in tickets if queue.held_of(t) is None and not t.finished]
        if not waiting:
            return  # taken already (slots were idle), or refused
        held = queue.held()
        wanted = len(waiting) - (self._slots() - len(held))
        if wanted < 1:
            return  # idle slots take them
        request, cap = waiting[0].request, queue.policy.tenant_max_slots
        capped = bool(cap) and queue.running(request.tenant) + len(waiting) > cap
        serving = [
            (h, h.item.serving)
            for h in held
            if h.item.serving is not None and (not capped or h.tenant == request.tenant)
        ]
        running = [Running(h.priority, h.taken_s, s.asked, h.tenant) for h, s in serving]
        weight = None if capped else queue.policy.weight  # a capped tenant claims no share
        while (
            wanted
            and (i := victim(request.priority, running, tenant=request.tenant, weight=weight)) is not None
        ):
            wanted -= serving[i][1].ask(for_priority=request.priority)  # (False: it ended meanwhile)
            running[i] = dataclasses.replace(running[i], asked=True)

    def _check(self, ticket: Ticket, estimates: list[QueueEstimate]) -> Callable[[Sequence[Ticket]], None]:
        """The mailbox's check for ``ticket``, once queued and before a slot may take it: its
        estimate goes in ``estimates``; a deadline it misses refuses it."""

        def check(_: Sequence[Ticket]) -> None:
            estimate = self._estimate(ticket, self._clock())
            estimates.append(estimate)
            waited_s = max(0.0, (time.perf_counter_ns() - ticket.admitted_ns) / 1e9)
            self._check_deadline(ticket.request, estimate, waited_s)

        return check

    def _placement(self, request: GenerateRequest | ChatRequest) -> Placement:
        cost = float(request.max_tokens or self.config.max_tokens_limit)
        return Placement(priority=request.priority, tenant=request.tenant, cost=cost)

    def _check_deadline(
        self, request: GenerateRequest | ChatRequest, estimate: QueueEstimate, waited_s: float
    ) -> None:
        """Refuse ``request`` if its first token is predicted past its deadline, counted from
        when it was asked for: ``waited_s`` (for its model's load, for room in the queue) is
        spent already. A retry waits neither, so its Retry-After is the prediction's excess."""
        deadline_ms = request.deadline_ms
        if deadline_ms is None:
            return
        ttft = estimate.predicted_ttft_s or 0.0  # no prediction yet: only the wait can miss it
        first_s = waited_s + ttft
        if first_s * 1000 <= deadline_ms:
            return
        raise DeadlineUnmetError(deadline_ms, first_s * 1000, max(0.0, ttft - deadline_ms / 1000))

    def _refused(self, exc: QueueFullError, request: GenerateRequest | ChatRequest) -> None:
        """Put the predicted wait in a refusal that has none: when the tenant's first waiting
        request starts (tenant cap), or the queue's first (the mailbox full)."""
        if exc.retry_after_s is not None or not self.predictor.ready:
            return
        now = self._clock()
        order = self.mailbox.queue.order(now)
        starts = self._starts(order, now)
        first = 0
        if isinstance(exc, TenantQueueFullError):
            mine = [i for i, t in enumerate(order) if t.request.tenant == request.tenant]
            first = mine[0] if mine else len(order)
        exc.retry_after_s = starts[min(first, len(starts) - 1)]

    def _expect(self, ticket: Ticket, estimate: QueueEstimate) -> None:
        if ticket.group is not None:
            return  # a choice leaves the queue with the others (ChoiceStream closes them together)
        if estimate.predicted_start_s is not None:
            self._predicted[id(ticket)] = self._clock() + estimate.predicted_start_s
        if not ticket.finished:  # cancelled while it waits: out of the queue at once (its slot listens later)
            ticket.listen(lambda: self._withdraw(ticket))

    def _withdraw(self, ticket: Ticket) -> None:
        if self.mailbox.remove(ticket):
            ticket.finish("cancel")

    # -- prediction ----------------------------------------------------------------------------

    def _work(self, ticket: Ticket) -> Work:
        request = ticket.request
        return self.predictor.work(prompt_chars(request), request.max_tokens or self.config.max_tokens_limit)

    def _starts(self, order: Sequence[Ticket], now: float) -> list[float]:
        held = self.mailbox.queue.held()
        running = self.predictor.remainings_s(
            [self._work(h.item) for h in held], [now - h.taken_s for h in held]
        )
        return self.predictor.starts(self._slots(), running, [self._work(t) for t in order])

    def _estimate(self, ticket: Ticket, now: float) -> QueueEstimate:
        order = self.mailbox.queue.order(now)
        position = next((i for i, t in enumerate(order) if t is ticket), len(order))
        if not self.predictor.ready:
            return QueueEstimate(position=position, predicted_start_s=None, predicted_ttft_s=None)
        if position < self._slots() - len(self.mailbox.queue.held()):
            # An idle slot is left for it: playing the queue forward (WaitPredictor.starts) starts
            # it at once, so the work of the requests running and ahead is not needed (an
            # admission into idle slots costs O(1) predictions, not O(slots + queue)).
            start = 0.0
        else:
            start = self._starts(order[:position], now)[position]
        ttft = start + self.predictor.prefill_s(self._work(ticket))
        return QueueEstimate(position=position, predicted_start_s=start, predicted_ttft_s=ttft)

    def queued(self) -> tuple[tuple[QueuedRequest, ...], tuple[QueueDepth, ...]]:
        """The first ``STATUS_QUEUE_LIMIT`` waiting requests in the queue's order, each with its
        predicted start; and the depth of each (priority, tenant) label pair."""
        now = self._clock()
        order = self.mailbox.queue.order(now)
        shown = order[:STATUS_QUEUE_LIMIT]
        starts = self._starts(shown, now) if self.predictor.ready else [None] * (len(shown) + 1)
        listed = tuple(
            QueuedRequest(
                position=i,
                priority=t.request.priority,
                tenant=t.request.tenant,
                waited_s=max(0.0, (time.perf_counter_ns() - t.admitted_ns) / 1e9),
                predicted_start_s=starts[i],
            )
            for i, t in enumerate(shown)
        )
        depths: dict[tuple[str, str], int] = {}
        for _, priority, tenant, _ in self.mailbox.queue.waiting():
            key = (priority_label(priority), self.tenant_label(tenant))
            depths[key] = depths.get(key, 0) + 1
        return listed, tuple(
            QueueDepth(priority=p, tenant=t, depth=n) for (p, t), n in sorted(depths.items())
        )

    # -- measurements --------------------------------------------------------------------------

    def step(self, report: StepReport) -> None:
        """An Observer's step event: the step time at the current batch."""
        self.predictor.observe_step(
            report.seconds, report.n_tokens, report.n_prompt_tokens, report.n_sequences
        )

    def _taken(self, ticket: Ticket, held: Held[Ticket]) -> None:
        if ticket.parked is not None:
            return  # a preempted request resuming: it started before
        predicted = self._predicted.pop(id(ticket), None)
        error = None if predicted is None else abs(held.taken_s - predicted)
        self._observers.request_started(
            priority_label(held.priority),
            self.tenant_label(held.tenant),
            held.taken_s - held.admitted_s,
            error,
        )

    def ended(self, ticket: Ticket, stats: RequestStats | None) -> None:
        """``ticket`` ended (whoever ended it): its slot is free for its tenant, and a request
        that ran teaches the rates."""
        self._predicted.pop(id(ticket), None)
        self.mailbox.done(ticket)
        if stats is None or stats.completion_tokens == 0:
            return
        request = ticket.request
        self.predictor.observe_request(
            prompt_chars=prompt_chars(request),
            prompt_tokens=stats.prompt_tokens,
            evaluated=stats.prompt_tokens - stats.prompt_tokens_cached,
            prefill_s=stats.prefill_duration_ns / 1e9,
            decode_s=stats.decode_duration_ns / 1e9,
            generated=stats.completion_tokens,
            max_new=request.max_tokens or self.config.max_tokens_limit,
        )
