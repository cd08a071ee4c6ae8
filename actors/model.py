"""ModelActor: owns the backend (weights + context) and runs the step loop.

Every step packs the pending tokens of all busy sequences into one batch (continuous
batching): one token for each generating sequence first, then prompt chunks in arrival order
within the ``n_batch`` token budget. The batch is decoded and sampled in a worker thread
(one at a time, so one thread touches the context), and each sampled token is delivered to
its slot's inbox. Sequences continue by themselves: the sampled token is the next input, until
EOS or ``max_tokens``; a slot ends a sequence early with :meth:`ModelActor.end` (stop string,
cancel), which takes effect at the next step boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import msgspec
import numpy as np
from anyio.streams.memory import MemoryObjectSendStream

from runtime.backends.base import Backend, SamplerSpec, StepPlan, StepResult
from runtime.errors import GenerationError

__all__ = ["Delivery", "ModelActor", "ModelStatistics", "SequenceJob"]

INBOX_LEAD = 2
"""Tokens a sequence may be ahead of its slot before it is paused (a slow consumer)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a slot receives from a step: a token, or the end of its sequence."""

    token: int
    finish: str | None = None
    """``stop`` (EOS), ``length`` (max_tokens), ``cancel`` or ``error``; None to continue."""
    error: BaseException | None = None


@dataclass(eq=False, slots=True)
class SequenceJob:
    """One request's sequence as the step loop sees it."""

    seq_id: int
    prompt: list[int]
    start: int
    """Position of the first prompt token to evaluate (earlier ones are cached cells)."""
    max_new: int
    sampler: SamplerSpec | None
    inbox: MemoryObjectSendStream[Delivery]
    fed: int = field(init=False)
    pos: int = field(init=False)
    generated: int = 0
    next_token: int = -1
    ended: bool = False

    def __post_init__(self) -> None:
        self.fed = self.start
        self.pos = self.start

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


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
    """Whether a step (or a resize) is running in the worker thread now."""


class ModelActor:
    """Runs the step loop over one backend; slots call :meth:`begin` and :meth:`end`.

    :param n_batch: tokens one step decodes at most.
    :param on_step: called on the event loop after each decode step with (tokens, sequences,
        prompt tokens, seconds): :meth:`runtime.events.Observer.step`.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        n_batch: int,
        on_step: Callable[[int, int, int, float], None] | None = None,
    ) -> None:
        self.backend = backend
        self.n_batch = n_batch
        self._on_step = on_step
        self._jobs: dict[int, SequenceJob] = {}
        self._trims: list[tuple[int, int]] = []
        self._samplers: dict[int, SamplerSpec | None] = {}
        self._wakeup = anyio.Event()
        self._limiter = anyio.CapacityLimiter(1)
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
        self._trims.append((job.seq_id, job.start))
        self._samplers[job.seq_id] = job.sampler
        self._jobs[job.seq_id] = job
        self.notify()

    def end(self, seq_id: int, keep: int = 0) -> None:
        """Stop the sequence now; at the next step drop its KV cells at positions >= ``keep``."""
        job = self._jobs.pop(seq_id, None)
        if job is not None:
            job.ended = True
        self._trims.append((seq_id, keep))
        self.notify()

    def notify(self) -> None:
        """Wake the step loop (new work, or a paused slot read its inbox)."""
        self._wakeup.set()

    async def run_sync(self, fn: Callable[..., object], *args: object) -> object:
        """Run ``fn(*args)`` on the context's worker thread, between steps."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def resize(self, n_seq: int) -> tuple[float, int]:
        """Replace the context by one of ``n_seq`` sequences between two steps (weights kept,
        sequences below ``n_seq`` carried across); the caller has emptied the ones above.

        :returns: (seconds no step could run, bytes of sequence state carried).
        """

        def work() -> tuple[float, int]:
            start = time.perf_counter()
            carried = self.backend.resize(n_seq)
            return time.perf_counter() - start, carried

        self._trims = [(s, p) for s, p in self._trims if s < n_seq]
        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    # -- the step loop -----------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Step until cancelled. A failing step fails every job in it, then raises."""
        task_status.started()
        while True:
            plan, rows = self._plan()
            if plan is None:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                continue
            start = time.perf_counter()
            self._in_step = True
            try:
                result: StepResult = await anyio.to_thread.run_sync(
                    self.backend.step, plan, limiter=self._limiter
                )
            except Exception as exc:
                self._failed_steps += 1
                self._fail_all(exc)
                raise
            finally:
                self._in_step = False
            seconds = time.perf_counter() - start
            n_sequences = self._account(plan, seconds)
            self._deliver(plan, rows, result)
            if self._on_step is not None and plan.n_tokens:
                self._on_step(plan.n_tokens, n_sequences, plan.n_prompt_tokens, seconds)

    def _plan(self) -> tuple[StepPlan | None, list[SequenceJob]]:
        """Choose this step's tokens: one for each decoding sequence, then prompt chunks (FIFO)
        within the budget. The batch holds them in sequence order: llama.cpp decodes a batch
        whose sequences are out of order in costlier micro-batches (15-50% more CPU time for
        8 sequences of the embedded model)."""
        decoding: list[SequenceJob] = []
        prefilling: list[SequenceJob] = []
        for job in self._jobs.values():
            if job.inbox.statistics().current_buffer_used >= INBOX_LEAD:
                continue  # its slot has not read what it has: pause it, not the batch
            (prefilling if job.prefilling else decoding).append(job)
        budget = self.n_batch - len(decoding)
        parts: list[tuple[SequenceJob, int]] = [(job, 0) for job in decoding]  # 0: its next token
        for job in prefilling:
            if budget <= 0:
                break
            n = min(budget, len(job.prompt) - job.fed)
            parts.append((job, n))
            budget -= n
        if not parts and not self._trims and not self._samplers:
            return None, []
        parts.sort(key=lambda part: part[0].seq_id)
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        out_rows: list[int] = []
        rows: list[SequenceJob] = []
        for job, n in parts:
            if n == 0:
                tokens.append(job.next_token)
                positions.append(job.pos)
                seqs.append(job.seq_id)
            else:
                tokens += job.prompt[job.fed : job.fed + n]
                positions += range(job.pos, job.pos + n)
                seqs += [job.seq_id] * n
                if job.fed + n < len(job.prompt):
                    continue  # more of the prompt to come: nothing to sample yet
            out_rows.append(len(tokens) - 1)
            rows.append(job)
        plan = StepPlan(
            tokens=np.array(tokens, dtype=np.int32),
            positions=np.array(positions, dtype=np.int32),
            seq_ids=np.array(seqs, dtype=np.int32),
            output_rows=np.array(out_rows, dtype=np.int32),
            trims=self._trims,
            samplers=self._samplers,
            n_prompt_tokens=len(tokens) - len(decoding),
            n_sequences=len(parts),
        )
        self._trims, self._samplers = [], {}
        # Advance prompt bookkeeping now; the jobs in ``rows`` advance when tokens arrive.
        for job, n in parts:
            job.fed += n
            job.pos += n or 1
        return plan, rows

    def _deliver(self, plan: StepPlan, rows: list[SequenceJob], result: StepResult) -> None:
        tokens = result.tokens.tolist()
        eog = self.backend.eog_tokens
        for i, job in enumerate(rows):
            if job.ended:
                continue  # ended while the step ran; its cells are trimmed next step
            error = result.row_errors.get(i)
            if error is not None:
                self._finish(job, Delivery(-1, "error", error))
                continue
            token = tokens[i]
            job.generated += 1
            if token in eog:
                self._finish(job, Delivery(token, "stop"))
            elif job.generated >= job.max_new:
                self._finish(job, Delivery(token, "length"))
            else:
                job.next_token = token
                job.inbox.send_nowait(Delivery(token))

    def _finish(self, job: SequenceJob, delivery: Delivery) -> None:
        job.ended = True
        self._jobs.pop(job.seq_id, None)
        job.inbox.send_nowait(delivery)

    def _fail_all(self, exc: BaseException) -> None:
        error = GenerationError(f"the model step failed ({exc!r}); every request in it failed")
        for job in list(self._jobs.values()):
            self._finish(job, Delivery(-1, "error", error))

    def _account(self, plan: StepPlan, seconds: float) -> int:
        """Count the step; return how many sequences it carried."""
        if plan.n_tokens == 0:
            return 0  # only housekeeping (trims, samplers): no decode happened
        self._steps += 1
        self._tokens_decoded += plan.n_tokens
        self._tokens_sampled += len(plan.output_rows)
        n = plan.n_sequences
        self._last_sequences = n
        self._steps_by_sequences[n] = self._steps_by_sequences.get(n, 0) + 1
        self._step_seconds += seconds
        return n

    def statistics(self) -> ModelStatistics:
        """A snapshot of the step counters."""
        return ModelStatistics(
            steps=self._steps,
            tokens_decoded=self._tokens_decoded,
            tokens_sampled=self._tokens_sampled,
            sequences_active=len(self._jobs),
            last_step_sequences=self._last_sequences,
            step_seconds_total=self._step_seconds,
            failed_steps=self._failed_steps,
            steps_by_sequences=dict(self._steps_by_sequences),
            pending_trims=len(self._trims),
            kv_cells_active=sum(job.pos for job in self._jobs.values()),
            stepping=self._in_step or self._limiter.borrowed_tokens > 0,
        )
