"""The step planner: which tokens the next step carries, and what a step's results mean.

A pure unit, with no event loop, thread or model (vLLM tests its Scheduler the same way): it
holds the sequences being served (:class:`SequenceJob`), the KV trims and sampler changes
queued since the last step, and turns them into a :class:`StepBatch`. Every step carries one
token for each generating sequence first, then prompt chunks in arrival order within the
``n_batch`` token budget, and beside decoding sequences within the prefill budget
(actors.budget: a long prompt spreads over steps instead of stalling the decoders). Sequences continue by themselves: :meth:`Scheduler.advance` makes
each sampled token the sequence's next input, until end of generation or ``max_tokens``.

A request's n choices share one prefill: a job whose ``leader`` (another choice of the same
request, with the same prompt) is still evaluating its prompt waits; in the step that feeds
the leader's last prompt token, the waiting jobs sample their first tokens from that same row
(each with its own sampler), and the next step copies the leader's KV cells to their sequences
first. A job whose leader is gone or past its prompt evaluates the prompt itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Literal, Protocol

import numpy as np

from actors.budget import PrefillBudget
from runtime.backends.base import SamplerSpec, StepLogprobs, StepPlan, StepResult
from runtime.core.messages import TokenLogprob, TopLogprob

__all__ = ["Delivery", "Finish", "Scheduler", "SequenceJob", "StepBatch", "TokenSink"]

Finish = Literal["stop", "length"] | None
"""Why a sampled token ends its sequence: ``stop`` (end of generation), ``length`` (max_tokens)."""
_seq_id = attrgetter("seq_id")


class TokenSink(Protocol):
    """Where a sequence's tokens go: the slot's side of it (actors.sink.RequestSink)."""

    @property
    def blocked(self) -> bool:
        """Its caller has not read what it was sent: the sequence is skipped meanwhile."""
        ...

    def take(self, token: int, finish: Finish, at_ns: int, logprob: TokenLogprob | None = None) -> bool:
        """One token; ``at_ns``: when its step ended; ``logprob`` where its job asked for them.
        Returns whether the sequence goes on."""
        ...

    def fail(self, error: BaseException) -> None:
        """The sequence failed (its row, or the whole step)."""
        ...


@dataclass(eq=False, slots=True)
class SequenceJob:
    """One request's sequence as the step loop sees it."""

    seq_id: int
    prompt: list[int]
    start: int
    """Position of the first prompt token to evaluate (earlier ones are cached cells)."""
    max_new: int
    sampler: SamplerSpec | None
    sink: TokenSink
    fed: int = field(init=False)
    """Prompt tokens put into a batch so far."""
    pos: int = field(init=False)
    """Position of the next token this sequence feeds."""
    leader: SequenceJob | None = None
    """Another choice of the same request whose prompt evaluation this one shares (None: it
    evaluates its own). Cleared once it no longer waits."""
    top_logprobs: int = -1
    """-1: no log-probabilities; else each token's, and this many most likely tokens'."""
    generated: int = 0
    next_token: int = -1
    done: bool = False
    """Out of the steps: it finished, failed, or its slot removed it."""

    def __post_init__(self) -> None:
        self.fed = self.start
        self.pos = self.start

    @property
    def prefilling(self) -> bool:
        """Whether prompt tokens are still to be fed."""
        return self.fed < len(self.prompt)


@dataclass(slots=True)
class StepBatch:
    """What one step decodes (``plan``), and the job of each output row, in order (``rows``)."""

    plan: StepPlan
    rows: list[SequenceJob]


@dataclass(slots=True)
class Delivery:
    """A step's tokens for the sinks: ``jobs[i]`` gets ``tokens[i]``, ending with ``finishes[i]``;
    ``at_ns`` is when the step ended (``time.perf_counter_ns``). The sinks are the event loop's:
    the step loop hands a Delivery over and never calls a sink itself."""

    jobs: list[SequenceJob] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finishes: list[Finish] = field(default_factory=list)
    at_ns: int = 0
    failed: list[tuple[SequenceJob, BaseException]] = field(default_factory=list)
    """Jobs whose row failed, with the error for their sinks."""
    logprobs: StepLogprobs | None = None
    """The step's log-probabilities, where some of its jobs asked for them."""
    logprob_rows: list[int] = field(default_factory=list)
    """With ``logprobs``: for each of ``jobs``, its row there (-1: it did not ask)."""

    def __len__(self) -> int:
        return len(self.jobs)

    def logprob(self, i: int) -> TokenLogprob | None:
        """The log-probability record of ``tokens[i]`` (None if its job did not ask)."""
        lp = self.logprobs
        if lp is None or (row := self.logprob_rows[i]) < 0:
            return None
        k = self.jobs[i].top_logprobs
        top = tuple(
            TopLogprob(token_id=t, logprob=v)
            for t, v in zip(lp.top_ids[row, :k].tolist(), lp.top_logprobs[row, :k].tolist(), strict=True)
        )
        return TokenLogprob(token_id=self.tokens[i], logprob=float(lp.chosen[row]), top=top)


class Scheduler:
    """The sequences being served and the housekeeping queued for the next step.

    :param n_batch: tokens one step decodes at most.
    :param share_prompts: whether the backend copies KV cells between sequences (else every job
        evaluates its own prompt).
    :param budget: caps the prompt tokens of a step with decoding sequences (None: only
        ``n_batch`` does).
    """

    def __init__(
        self, n_batch: int, *, share_prompts: bool = True, budget: PrefillBudget | None = None
    ) -> None:
        self.n_batch = n_batch
        self.share_prompts = share_prompts
        self.budget = budget if budget is not None and budget.active else None
        self._jobs: dict[int, SequenceJob] = {}
        self._trims: list[tuple[int, int]] = []
        self._samplers: dict[int, SamplerSpec | None] = {}
        self._copies: list[tuple[int, int]] = []
        self._waiting: dict[int, list[SequenceJob]] = {}
        """Leader's seq_id -> the jobs waiting to share its prompt."""
        self._logprob_jobs = 0
        """Jobs in the steps that asked for log-probabilities (0: no step looks for them)."""

    # -- what the slots ask ------------------------------------------------------------------

    def add(self, job: SequenceJob) -> None:
        """Serve ``job`` from the next step on: drop its sequence's cells from ``job.start`` on
        first, and set its sampler. A job with a ``leader`` that is still evaluating the same
        prompt waits to share it; otherwise it evaluates its own."""
        leader = job.leader
        if leader is not None:
            if (
                self.share_prompts
                and self._jobs.get(leader.seq_id) is leader
                and not leader.done
                and leader.leader is None
                and leader.prefilling
                and leader.prompt == job.prompt
            ):
                self._waiting.setdefault(leader.seq_id, []).append(job)
            else:
                job.leader = None
        self._trims.append((job.seq_id, job.start))
        self._samplers[job.seq_id] = job.sampler
        if (old := self._jobs.get(job.seq_id)) is not None:
            self.drop(old)
        self._jobs[job.seq_id] = job
        if job.top_logprobs >= 0:
            self._logprob_jobs += 1

    def remove(self, seq_id: int, keep: int = 0) -> None:
        """Take the sequence out of the steps now; at the next step drop its KV cells at
        positions >= ``keep``, and its sampler (a constrained one's matcher with it: a step with
        no constrained row pays nothing for one that has finished)."""
        if (job := self._jobs.get(seq_id)) is not None:
            self.drop(job)
        self._trims.append((seq_id, keep))
        self._samplers[seq_id] = None

    def drop(self, job: SequenceJob) -> None:
        """Take ``job`` out of the coming steps if it is still in them (its cells stay until its
        slot calls :meth:`remove`)."""
        job.done = True
        if self._jobs.get(job.seq_id) is job:
            del self._jobs[job.seq_id]
            if job.top_logprobs >= 0:
                self._logprob_jobs -= 1
            for follower in self._waiting.pop(job.seq_id, ()):
                follower.leader = None  # the leader is gone: each evaluates the prompt itself

    def drop_all(self) -> list[SequenceJob]:
        """Take every job out of the steps (the step failed); return them."""
        jobs = list(self._jobs.values())
        for job in jobs:
            self.drop(job)
        self._waiting.clear()
        return jobs

    def pause(self, job: SequenceJob) -> bool:
        """Take ``job`` out of the steps as it is, to be :meth:`resume`-d later in any sequence
        (preemption: its cells are saved first, actors.preemption). Only a job past its first
        token can pause: not one that is evaluating its prompt, sharing one (a choice of n), or
        whose cells a queued copy is still to write. Its sequence's cells stay until its slot
        trims them, and its sampler is the backend's to park. Returns whether it paused."""
        seq = job.seq_id
        if (
            self._jobs.get(seq) is not job
            or job.done
            or job.prefilling
            or job.generated < 1
            or job.leader is not None
            or seq in self._waiting
            or any(dst == seq for _, dst in self._copies)
        ):
            return False
        del self._jobs[seq]
        if job.top_logprobs >= 0:
            self._logprob_jobs -= 1
        self._samplers.pop(seq, None)  # a change queued for it would replace the sampler parked now
        return True

    def resume(self, job: SequenceJob, seq_id: int) -> None:
        """Serve a paused ``job`` again from the next step, in sequence ``seq_id``, whose cells
        and sampler were just replaced by the job's own: what was queued for that sequence
        (trims, a sampler change, a copy) is discarded."""
        self._trims = [(s, p) for s, p in self._trims if s != seq_id]
        self._copies = [(s, d) for s, d in self._copies if d != seq_id]
        self._samplers.pop(seq_id, None)
        if (old := self._jobs.get(seq_id)) is not None:
            self.drop(old)
        job.seq_id = seq_id
        self._jobs[seq_id] = job
        if job.top_logprobs >= 0:
            self._logprob_jobs += 1

    def forget_trims(self, seq_id: int) -> None:
        """Discard the sequence's queued trims (its cells were just replaced by a restored state)."""
        self._trims = [(s, p) for s, p in self._trims if s != seq_id]

    def forget_above(self, n_seq: int) -> None:
        """Discard queued trims of sequences ``n_seq`` and up (they leave with a resize)."""
        self._trims = [(s, p) for s, p in self._trims if s < n_seq]
        self._copies = [(s, d) for s, d in self._copies if s < n_seq and d < n_seq]
        self._samplers = {s: spec for s, spec in self._samplers.items() if s < n_seq}

    # -- the step ----------------------------------------------------------------------------

    def plan(self) -> StepBatch | None:
        """The next step, or None when there is nothing to decode and no housekeeping queued.

        Sequences whose sink is blocked are left out (a slow caller pauses only its own
        request). The batch holds its rows in sequence order: llama.cpp decodes a batch whose
        sequences are out of order in costlier micro-batches (15-50% more CPU time for 8
        sequences of the embedded model). The queued trims and samplers go with it.
        """
        decoding: list[SequenceJob] = []
        prefilling: list[SequenceJob] = []
        for job in self._jobs.values():
            if job.done or job.sink.blocked or job.leader is not None:
                continue  # done: cancelled since (its drop is on its way); a leader: it waits
            (prefilling if job.prefilling else decoding).append(job)
        if not decoding and not prefilling and not self._trims and not self._samplers and not self._copies:
            return None
        if not prefilling:  # the usual step: one token per sequence, filled in bulk
            decoding.sort(key=_seq_id)
            plan = self._issue(
                [job.next_token for job in decoding],
                [job.pos for job in decoding],
                [job.seq_id for job in decoding],
                range(len(decoding)),
                n_prompt_tokens=0,
            )
            for job in decoding:
                job.pos += 1
            return self._with_logprobs(StepBatch(plan, decoding))
        return self._with_logprobs(self._plan_prefill(decoding, prefilling))

    def _with_logprobs(self, batch: StepBatch) -> StepBatch:
        """Mark the outputs whose jobs asked for log-probabilities (a look at each row only
        while some job in the steps asked)."""
        if self._logprob_jobs:
            asked = [i for i, job in enumerate(batch.rows) if job.top_logprobs >= 0]
            if asked:
                batch.plan.logprob_outputs = np.array(asked, dtype=np.int32)
                batch.plan.top_logprobs = max(batch.rows[i].top_logprobs for i in asked)
        return batch

    def _plan_prefill(self, decoding: list[SequenceJob], prefilling: list[SequenceJob]) -> StepBatch:
        budget = self.n_batch - len(decoding)
        if decoding and self.budget is not None:
            limit = self.budget.limit(len(decoding))
            if limit < budget and sum(len(job.prompt) - job.fed for job in prefilling) > limit:
                self.budget.capped_steps += 1
            budget = min(budget, limit)
        parts: list[tuple[SequenceJob, int]] = [(job, 0) for job in decoding]  # 0: its next token
        for job in prefilling:
            if budget <= 0:
                break
            n = min(budget, len(job.prompt) - job.fed)
            parts.append((job, n))
            budget -= n
        parts.sort(key=lambda part: part[0].seq_id)
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        out_rows: list[int] = []
        rows: list[SequenceJob] = []
        shared: list[tuple[SequenceJob, SequenceJob]] = []
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
            if n and (waiting := self._waiting.pop(job.seq_id, None)):
                for follower in waiting:  # its first token comes from the leader's last row
                    if not follower.done:
                        out_rows.append(len(tokens) - 1)
                        rows.append(follower)
                        shared.append((job, follower))
        plan = self._issue(tokens, positions, seqs, out_rows, n_prompt_tokens=len(tokens) - len(decoding))
        for job, n in parts:  # prompt bookkeeping now; the rows advance when their tokens arrive
            job.fed += n
            job.pos += n or 1
        if shared:
            plan.sample_seqs = np.array([job.seq_id for job in rows], dtype=np.int32)
            for leader, follower in shared:  # the leader's cells are in after this step
                follower.leader = None
                follower.fed = follower.pos = len(follower.prompt)
                self._copies.append((leader.seq_id, follower.seq_id))
        return StepBatch(plan, rows)

    def _issue(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seqs: Sequence[int],
        out_rows: Sequence[int],
        *,
        n_prompt_tokens: int,
    ) -> StepPlan:
        """The StepPlan of these batch rows, with the trims and samplers gathered since the
        last step (which it takes over)."""
        plan = StepPlan(
            tokens=np.array(tokens, dtype=np.int32),
            positions=np.array(positions, dtype=np.int32),
            seq_ids=np.array(seqs, dtype=np.int32),
            output_rows=np.array(out_rows, dtype=np.int32),
            trims=self._trims,
            samplers=self._samplers,
            copies=self._copies,
            n_prompt_tokens=n_prompt_tokens,
            n_sequences=len(set(seqs)),
        )
        self._trims, self._samplers, self._copies = [], {}, []
        return plan

    def advance(self, batch: StepBatch, result: StepResult, eog: frozenset[int], at_ns: int) -> Delivery:
        """Apply a step's sampled tokens: each sequence's next input token, and the ends (end of
        generation in ``eog``, ``max_tokens``; a failed row leaves the steps at once).
        Returns the tokens and the failures for the sinks."""
        errors = result.row_errors
        out = Delivery(at_ns=at_ns, logprobs=result.logprobs)
        jobs, tokens, finishes = out.jobs, out.tokens, out.finishes
        lp_row: dict[int, int] = {}
        if result.logprobs is not None:
            lp_row = {o: r for r, o in enumerate(result.logprobs.outputs.tolist())}
        for i, (job, token) in enumerate(zip(batch.rows, result.tokens.tolist(), strict=True)):
            if job.done:
                continue  # ended while the step ran; its cells are trimmed next step
            if errors and i in errors:
                self.drop(job)
                out.failed.append((job, errors[i]))
                continue
            job.generated += 1
            finish: Finish = None
            if token in eog:
                finish = "stop"
            elif job.generated >= job.max_new:
                finish = "length"
            else:
                job.next_token = token
            if finish is not None:
                self.drop(job)
            jobs.append(job)
            tokens.append(token)
            finishes.append(finish)
            if lp_row:
                out.logprob_rows.append(lp_row.get(i, -1))
        return out

    # -- what it holds -----------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Sequences in the steps."""
        return len(self._jobs)

    @property
    def pending_trims(self) -> int:
        """KV removals queued for the next step."""
        return len(self._trims)

    @property
    def kv_cells_active(self) -> int:
        """KV cells written so far by the sequences in the steps."""
        return sum(job.pos for job in list(self._jobs.values()))
