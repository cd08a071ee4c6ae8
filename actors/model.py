"""ModelActor: owns the backend (weights + context) and runs the step loop.

The step loop runs on the ModelActor's worker thread and never waits for the event loop:
plan a step (actors.scheduler: the pending tokens of all busy sequences in one batch),
decode and sample it, advance the sequences, plan the next one, back to back. It is the one
thread that touches the context and the scheduler. The event loop reaches it through an
inbox of commands (new jobs, ends, cancels, resizes), applied between two steps; it gets the
steps' tokens in bulk (one wake-up for all the steps finished since the last) and hands them
to the slots' sinks (actors.sink), which turn them into text and stream it while the next
steps decode. A sink ends its sequence (a stop string, a cancel) through the inbox; the step
loop runs at most :data:`MAX_AHEAD` steps ahead of the sinks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from actors.budget import PrefillBudget
from actors.host_cache import HostPromptCache
from actors.preemption import PreemptionLedger, Snapshot
from actors.scheduler import Delivery, Scheduler, SequenceJob, StepBatch
from actors.worker import WorkerThread, call_into
from runtime.backends.base import Backend, SequenceStates
from runtime.core.errors import GenerationError
from runtime.core.records import ModelStatistics, StepReport

__all__ = ["MAX_AHEAD", "ModelActor"]

log = logging.getLogger("slotserve.model")
T = TypeVar("T")

MAX_AHEAD = 2
"""Steps whose tokens the event loop has not taken yet, at most: past that the step loop waits
(a stop string or a cancel then costs at most this many extra steps)."""

_Command = tuple[Callable[..., Any], tuple[Any, ...]]
_Failure = tuple[list[SequenceJob], BaseException]


class ModelActor:
    """Runs the step loop over one backend; slots call :meth:`begin` and :meth:`end`.

    :param n_batch: tokens one step decodes at most.
    :param prefill_budget_s: seconds a step with decoding sequences should take at most
        (actors.budget; 0: no cap by time).
    :param prefill_budget_tokens: prompt tokens such a step carries at most (0: no cap by count).
    :param host_cache_bytes: bound of the host-RAM prompt cache (actors.host_cache); 0: none.
    :param on_step: called on the event loop after each decode step with its report
        (:meth:`runtime.core.events.Observer.step`); it must not raise.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        n_batch: int,
        prefill_budget_s: float = 0.0,
        prefill_budget_tokens: int = 0,
        host_cache_bytes: int = 0,
        on_step: Callable[[StepReport], None] | None = None,
    ) -> None:
        self.backend = backend
        self.budget = PrefillBudget(n_batch, budget_s=prefill_budget_s, budget_tokens=prefill_budget_tokens)
        """The step loop's own, as the scheduler: the steps' timings teach it."""
        self.scheduler = Scheduler(n_batch, share_prompts=backend.info.seq_copy, budget=self.budget)
        """The step loop's own: the event loop reads its counters and changes it by commands."""
        self.host_cache = HostPromptCache(host_cache_bytes) if host_cache_bytes > 0 else None
        """Saved sequence states (actors.state_swap); the event loop's own."""
        self.preemption = PreemptionLedger()
        """Sequences parked and resumed (actors.preemption); the event loop's own."""
        self._on_step = on_step
        self._worker = WorkerThread("slotserve-model")
        self._inbox: deque[_Command] = deque()
        self._wake = threading.Event()
        self._outbox: deque[tuple[Delivery, StepReport | None]] = deque()
        self._posted = False
        self._room = threading.Event()
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._steps = 0
        self._tokens_decoded = 0
        self._tokens_sampled = 0
        self._last_sequences = 0
        self._step_seconds = 0.0
        self._failed_steps = 0
        self._steps_by_sequences: dict[int, int] = {}
        self._in_step = False

    # -- called by slots, on the event loop --------------------------------------------------

    def begin(self, job: SequenceJob) -> None:
        """Start ``job`` at the next step: drop the sequence's cells from ``job.start`` on first."""
        self._command(self.scheduler.add, job)

    def end(self, seq_id: int, keep: int = 0) -> None:
        """Take the sequence out of the steps (from the next step on); at that step drop its
        KV cells at positions >= ``keep``."""
        self._command(self.scheduler.remove, seq_id, keep)

    def drop(self, job: SequenceJob) -> None:
        """Leave ``job`` out of the steps from now on (its cells stay until :meth:`end`)."""
        job.done = True  # the next plan skips it even before the command is applied
        self._command(self.scheduler.drop, job)

    @property
    def can_preempt(self) -> bool:
        """Whether the backend saves and restores sequence states (else nothing is preempted)."""
        return isinstance(self.backend, SequenceStates) and self.backend.info.state_export

    async def pause(self, job: SequenceJob) -> tuple[bytes, object] | None:
        """Between two steps, take ``job`` out of the steps as it is and save its sequence
        (actors.preemption): its cells' state and its parked sampler. None if it cannot pause
        now (ended, evaluating or sharing its prompt) or the state could not be saved (logged;
        the job goes on)."""
        backend = self.backend
        if not isinstance(backend, SequenceStates) or not backend.info.state_export:
            return None
        scheduler = self.scheduler

        def work() -> tuple[bytes, object] | None:
            if not scheduler.pause(job):
                return None
            try:
                state = backend.save_seq(job.seq_id)
            except Exception as exc:
                log.warning("sequence %d could not be saved for a preemption: %r", job.seq_id, exc)
                scheduler.resume(job, job.seq_id)  # nothing changed: it goes on
                return None
            return state, backend.park_sampler(job.seq_id)

        return await self.between_steps(work)

    async def resume(self, job: SequenceJob, seq_id: int, snapshot: Snapshot, *, cells_kept: bool) -> None:
        """Between two steps, put the paused ``job`` back in the steps in sequence ``seq_id``:
        its saved cells loaded there (not if ``cells_kept``: the sequence still holds them) and
        its sampler given back.

        :raises RuntimeError: if the state could not be loaded (the job stays out; its parked
            sampler is freed).
        """
        backend = self.backend
        assert isinstance(backend, SequenceStates)
        scheduler = self.scheduler

        def work() -> None:
            if not cells_kept:
                scheduler.forget_trims(seq_id)
                try:
                    backend.load_seq(seq_id, snapshot.state)
                except Exception:
                    backend.unpark_sampler(None, snapshot.sampler)
                    raise
            backend.unpark_sampler(seq_id, snapshot.sampler)
            scheduler.resume(job, seq_id)

        await self.between_steps(work)

    def discard(self, snapshot: Snapshot) -> None:
        """Free a snapshot whose request ended while it was parked."""
        backend = self.backend
        if isinstance(backend, SequenceStates):
            self.post(lambda: backend.unpark_sampler(None, snapshot.sampler))

    def notify(self) -> None:
        """Wake the step loop (a paused sequence's caller read its stream)."""
        self._wake.set()

    async def resize(self, n_seq: int) -> tuple[float, int]:
        """Replace the context by one of ``n_seq`` sequences between two steps (weights kept,
        sequences below ``n_seq`` carried across); the caller has emptied the ones above.

        :returns: (seconds no step could run, bytes of sequence state carried).
        """

        def work() -> tuple[float, int]:
            self.scheduler.forget_above(n_seq)
            start = time.perf_counter()
            carried = self.backend.resize(n_seq)
            return time.perf_counter() - start, carried

        return await self.between_steps(work)

    async def between_steps(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the step loop's thread between two steps; return what it returns.
        It runs to its end even if the caller is cancelled meanwhile.

        :raises BaseException: what ``fn`` raised.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._command(call_into, fn, (), future, loop)
        if not self._running:
            self._worker.submit(self._apply_inbox)  # no step loop to apply it
        return await WorkerThread.result(future)

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the step loop's thread between two steps, without waiting for it (the
        Embedder's decodes). ``fn`` must not raise: it runs inside the step loop."""
        self._command(fn)
        if not self._running:
            self._worker.submit(self._apply_inbox)  # no step loop to apply it

    def _command(self, fn: Callable[..., Any], *args: Any) -> None:
        self._inbox.append((fn, args))
        self._wake.set()

    # -- the step loop -----------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Step until cancelled. A failing step fails every job in it, then raises."""
        self._loop = asyncio.get_running_loop()
        self._stop = False
        self._running = True
        call = self._worker.submit(self._steps_in_thread)
        task_status.started()
        try:
            failure = await WorkerThread.result(call, interrupt=self._interrupt)
        finally:
            self._running = False
            self._deliver()  # the tokens of the last steps
            if self._inbox:  # a resize must not wait for a restart, nor run after the close
                with anyio.CancelScope(shield=True):
                    await self._worker.run_sync(self._apply_inbox)
        if failure is not None:
            jobs, exc = failure
            error = GenerationError(f"the model step failed ({exc!r}); every request in it failed")
            for job in jobs:
                job.sink.fail(error)
            raise exc

    def _interrupt(self) -> None:
        """On the event loop: the step loop should end after its current step."""
        self._stop = True
        self._wake.set()
        self._room.set()

    def _apply_inbox(self) -> None:
        """On the step loop's thread: apply the commands, in order."""
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            fn(*args)

    def _steps_in_thread(self) -> _Failure | None:
        """The step loop, on the worker thread; returns the failed step's jobs and error, or
        None when stopped."""
        scheduler, backend, eog = self.scheduler, self.backend, self.backend.eog_tokens
        outbox, room, wake = self._outbox, self._room, self._wake
        while not self._stop:
            while len(outbox) >= MAX_AHEAD and not self._stop:  # the sinks are behind: wait
                room.clear()
                if len(outbox) >= MAX_AHEAD and not self._stop:  # (a stop before the clear)
                    room.wait()
            wake.clear()
            self._in_step = True  # from the commands to the outbox: statistics() says "stepping"
            try:
                self._apply_inbox()
                batch = scheduler.plan()  # takes the trims: they are applied by the step below
                if batch is None:
                    self._in_step = False
                    if not self._stop:  # _interrupt sets _stop before wake: a stop before the clear
                        wake.wait()
                    continue
                start = time.perf_counter()
                try:
                    result = backend.step(batch.plan)
                except Exception as exc:
                    self._failed_steps += 1
                    return scheduler.drop_all(), exc
                report = self._account(batch, time.perf_counter() - start)
                self._post(scheduler.advance(batch, result, eog, time.perf_counter_ns()), report)
            finally:
                self._in_step = False
        return None

    def _post(self, delivery: Delivery, report: StepReport | None) -> None:
        """On the step loop's thread: hand a step's outcome to the event loop (one wake-up for
        all that gathers before the event loop takes it)."""
        self._outbox.append((delivery, report))
        if not self._posted:
            self._posted = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the event loop: every step's report and tokens that came since the last call."""
        self._posted = False
        outbox = self._outbox
        while outbox:
            delivery, report = outbox.popleft()
            self._overlap(delivery, report)
        self._room.set()

    def _overlap(self, delivery: Delivery, report: StepReport | None) -> None:
        """A step's report, and its tokens to the sinks, while the next steps decode. A sink
        that ends its sequence (a stop string) takes it out of the steps; a sink that raises
        fails only its own request (its slot crashes)."""
        if report is not None and self._on_step is not None:
            self._on_step(report)
        for job, error in delivery.failed:
            job.sink.fail(error)
        at_ns = delivery.at_ns
        with_logprobs = delivery.logprobs is not None
        for i, (job, token, finish) in enumerate(
            zip(delivery.jobs, delivery.tokens, delivery.finishes, strict=True)
        ):
            try:
                if with_logprobs and (logprob := delivery.logprob(i)) is not None:
                    going = job.sink.take(token, finish, at_ns, logprob)
                else:
                    going = job.sink.take(token, finish, at_ns)
            except Exception as exc:
                going = False
                job.sink.fail(exc)
            if not going and not job.done:
                self.drop(job)

    def _account(self, batch: StepBatch, seconds: float) -> StepReport | None:
        """Count the step; return its report for the observers (None if it decoded nothing)."""
        plan = batch.plan
        if plan.n_tokens == 0:
            return None  # only housekeeping (trims, samplers): no decode happened
        self._steps += 1
        self._tokens_decoded += plan.n_tokens
        self._tokens_sampled += len(plan.output_rows)
        n = plan.n_sequences
        self._last_sequences = n
        self._steps_by_sequences[n] = self._steps_by_sequences.get(n, 0) + 1
        self._step_seconds += seconds
        self.budget.observe(plan.n_prompt_tokens, plan.n_tokens - plan.n_prompt_tokens, seconds)
        return StepReport(
            n_tokens=plan.n_tokens, n_sequences=n, n_prompt_tokens=plan.n_prompt_tokens, seconds=seconds
        )

    def statistics(self) -> ModelStatistics:
        """A snapshot of the step counters."""
        s = self.scheduler
        return ModelStatistics(
            steps=self._steps,
            tokens_decoded=self._tokens_decoded,
            tokens_sampled=self._tokens_sampled,
            sequences_active=s.active,
            last_step_sequences=self._last_sequences,
            step_seconds_total=self._step_seconds,
            failed_steps=self._failed_steps,
            steps_by_sequences=dict(self._steps_by_sequences),
            pending_trims=s.pending_trims,
            kv_cells_active=s.kv_cells_active,
            stepping=self._in_step or bool(self._inbox) or bool(self._outbox),
            prefill_capped_steps=self.budget.capped_steps,
            host_cache=None if self.host_cache is None else self.host_cache.statistics(),
            preemption=self.preemption.statistics(),
        )
