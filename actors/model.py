"""ModelActor: owns the backend (weights + context) and runs the step loop.

Every step, the scheduler (actors.scheduler) packs the pending tokens of all busy sequences into
one batch (continuous batching); the batch is decoded and sampled in the worker thread (one
at a time, so one thread touches the context). While the worker decodes a step, the step loop
hands the previous step's tokens to the slots' sinks (actors.sink), which turn them into text
and stream it; a sink ends its sequence early (stop string, cancel) at the next step boundary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from actors.scheduler import Delivery, Scheduler, SequenceJob, StepBatch
from actors.worker import WorkerThread
from runtime.backends.base import Backend, StepResult
from runtime.core.errors import GenerationError
from runtime.core.records import ModelStatistics, StepReport

__all__ = ["ModelActor"]

log = logging.getLogger("slotserve.model")


class ModelActor:
    """Runs the step loop over one backend; slots call :meth:`begin` and :meth:`end`.

    :param n_batch: tokens one step decodes at most.
    :param on_step: called on the event loop after each decode step with its report
        (:meth:`runtime.core.events.Observer.step`); it must not raise.
    """

    def __init__(
        self, backend: Backend, *, n_batch: int, on_step: Callable[[StepReport], None] | None = None
    ) -> None:
        self.backend = backend
        self.scheduler = Scheduler(n_batch)
        self._on_step = on_step
        self._wakeup = anyio.Event()
        self._worker = WorkerThread("slotserve-model")
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
        self.scheduler.add(job)
        self.notify()

    def end(self, seq_id: int, keep: int = 0) -> None:
        """Take the sequence out of the steps now; at the next step drop its KV cells at
        positions >= ``keep``."""
        self.scheduler.remove(seq_id, keep)
        self.notify()

    def notify(self) -> None:
        """Wake the step loop (new work, or a paused sequence's caller read its stream)."""
        self._wakeup.set()

    async def resize(self, n_seq: int) -> tuple[float, int]:
        """Replace the context by one of ``n_seq`` sequences between two steps (weights kept,
        sequences below ``n_seq`` carried across); the caller has emptied the ones above.

        :returns: (seconds no step could run, bytes of sequence state carried).
        """

        def work() -> tuple[float, int]:
            start = time.perf_counter()
            carried = self.backend.resize(n_seq)
            return time.perf_counter() - start, carried

        self.scheduler.forget_above(n_seq)
        return await self._worker.run_sync(work)

    # -- the step loop -----------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Step until cancelled. A failing step fails every job in it, then raises.

        A step's tokens reach the slots' sinks while the next step decodes: only the
        bookkeeping that the next step needs (its input tokens, the sequences that ended) is
        done between two decodes.
        """
        task_status.started()
        delivery: Delivery | None = None
        report: StepReport | None = None
        scheduler = self.scheduler
        eog = self.backend.eog_tokens
        while True:
            batch = scheduler.plan()
            if batch is None:
                self._overlap(delivery, report)  # nothing to overlap with
                delivery, report = None, None
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                continue
            start = time.perf_counter()
            self._in_step = True
            try:
                call = self._worker.submit(self.backend.step, batch.plan)
                self._overlap(delivery, report)  # the previous step's, while this one decodes
                delivery, report = None, None
                result: StepResult = await self._worker.result(call)
            except Exception as exc:
                self._failed_steps += 1
                self._fail_all(exc)
                raise
            finally:
                self._in_step = False
            report = self._account(batch, time.perf_counter() - start)
            delivery = scheduler.advance(batch, result, eog, time.perf_counter_ns())

    def _overlap(self, delivery: Delivery | None, report: StepReport | None) -> None:
        """The work of a step that the next one does not wait for: its report, and its tokens
        to the sinks. A sink that ends its sequence (a stop string) takes it out of the next
        step; a sink that raises fails only its own request (its slot crashes)."""
        if report is not None and self._on_step is not None:
            self._on_step(report)
        if delivery is None:
            return
        drop = self.scheduler.drop
        at_ns = delivery.at_ns
        for job, token, finish in zip(delivery.jobs, delivery.tokens, delivery.finishes, strict=True):
            try:
                going = job.sink.take(token, finish, at_ns)
            except Exception as exc:
                going = False
                job.sink.fail(exc)
            if not going and not job.done:
                drop(job)

    def _fail_all(self, exc: BaseException) -> None:
        error = GenerationError(f"the model step failed ({exc!r}); every request in it failed")
        for job in self.scheduler.drop_all():
            job.sink.fail(error)

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
            stepping=self._in_step or self._worker.busy > 0,
        )
