"""The step planner alone: no model, no thread, no event loop (as vLLM tests its Scheduler)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.scheduler import Finish, Scheduler, SequenceJob, StepBatch
from runtime.backends.base import SamplerSpec, StepResult
from runtime.core.messages import TokenLogprob

EOS = 0


@dataclass
class Sink:
    blocked: bool = False
    failed: list[BaseException] = field(default_factory=list)

    def take(self, token: int, finish: Finish, at_ns: int, logprob: TokenLogprob | None = None) -> bool:
        return True

    def fail(self, error: BaseException) -> None:
        self.failed.append(error)


def job(
    seq: int, prompt: list[int], *, start: int = 0, max_new: int = 8, sink: Sink | None = None
) -> SequenceJob:
    return SequenceJob(seq, prompt, start, max_new, None, sink or Sink())


def result(batch: StepBatch, tokens: list[int], errors: dict[int, BaseException] | None = None) -> StepResult:
    assert len(tokens) == len(batch.rows)
    return StepResult(tokens=np.array(tokens, dtype=np.int32), row_errors=errors or {})


def test_nothing_to_do_plans_nothing() -> None:
    assert Scheduler(8).plan() is None


def test_a_prompt_is_fed_in_chunks_within_the_budget_and_sampled_once() -> None:
    s = Scheduler(n_batch=4)
    a = job(0, [11, 12, 13, 14, 15, 16])
    s.add(a)
    first = s.plan()
    assert first is not None
    assert first.plan.tokens.tolist() == [11, 12, 13, 14] and first.plan.positions.tolist() == [0, 1, 2, 3]
    assert first.plan.output_rows.tolist() == [] and first.rows == []  # nothing to sample yet
    assert first.plan.trims == [(0, 0)] and first.plan.samplers == {0: None}
    assert first.plan.n_prompt_tokens == 4
    second = s.plan()
    assert second is not None
    assert second.plan.tokens.tolist() == [15, 16] and second.plan.output_rows.tolist() == [1]
    assert second.rows == [a] and second.plan.trims == [] and second.plan.samplers == {}
    delivery = s.advance(second, result(second, [42]), frozenset({EOS}), at_ns=7)
    assert (delivery.jobs, delivery.tokens, delivery.finishes, delivery.at_ns) == ([a], [42], [None], 7)
    third = s.plan()
    assert third is not None
    assert third.plan.tokens.tolist() == [42] and third.plan.positions.tolist() == [6]
    assert third.plan.n_prompt_tokens == 0


def test_decoders_go_first_and_rows_are_in_sequence_order() -> None:
    s = Scheduler(n_batch=5)
    decoding = job(3, [1])
    s.add(decoding)
    batch = s.plan()
    assert batch is not None
    s.advance(batch, result(batch, [50]), frozenset({EOS}), 0)
    s.add(job(1, [7, 7, 7, 7, 7, 7, 7]))  # more than the budget left by the decoder
    s.add(job(2, [9, 9]))
    mixed = s.plan()
    assert mixed is not None
    assert mixed.plan.seq_ids.tolist() == [1, 1, 1, 1, 3]  # seq 2 waits: the budget is spent
    assert mixed.plan.tokens.tolist()[-1] == 50 and mixed.plan.n_prompt_tokens == 4
    assert [j.seq_id for j in mixed.rows] == [3] and mixed.plan.n_sequences == 2


def test_a_blocked_sink_pauses_only_its_sequence() -> None:
    s = Scheduler(n_batch=8)
    slow, fast = Sink(), Sink()
    s.add(job(0, [1], sink=slow))
    s.add(job(1, [2], sink=fast))
    batch = s.plan()
    assert batch is not None
    s.advance(batch, result(batch, [5, 6]), frozenset({EOS}), 0)
    slow.blocked = True
    paused = s.plan()
    assert paused is not None and paused.plan.seq_ids.tolist() == [1]
    slow.blocked = False
    resumed = s.plan()
    assert resumed is not None and sorted(resumed.plan.seq_ids.tolist()) == [0, 1]


def test_ends_by_eog_length_and_a_failed_row() -> None:
    s = Scheduler(n_batch=8)
    eog, length, bad = job(0, [1]), job(1, [1], max_new=1), job(2, [1])
    for j in (eog, length, bad):
        s.add(j)
    batch = s.plan()
    assert batch is not None
    error = RuntimeError("row 2")
    delivery = s.advance(batch, result(batch, [EOS, 9, 9], {2: error}), frozenset({EOS}), 0)
    assert delivery.finishes == ["stop", "length"] and delivery.jobs == [eog, length]
    assert delivery.failed == [(bad, error)]
    assert all(j.done for j in (eog, length, bad)) and s.active == 0
    only_trims = s.plan()
    assert only_trims is None  # nothing decodes and nothing was queued since


def test_remove_takes_a_sequence_out_and_trims_it_at_the_next_step() -> None:
    s = Scheduler(n_batch=8)
    a = job(0, [1, 2, 3])
    s.add(a)
    batch = s.plan()
    assert batch is not None
    s.remove(0, keep=2)  # while the step runs
    assert a.done
    delivery = s.advance(batch, result(batch, [4]), frozenset({EOS}), 0)
    assert len(delivery) == 0  # ended meanwhile: its token goes nowhere
    housekeeping = s.plan()
    assert housekeeping is not None
    assert housekeeping.plan.n_tokens == 0 and housekeeping.plan.trims == [(0, 2)]
    assert s.pending_trims == 0


def test_forget_above_drops_the_trims_of_sequences_that_leave() -> None:
    s = Scheduler(n_batch=8)
    for seq in range(4):
        s.remove(seq)
    s.forget_above(2)
    batch = s.plan()
    assert batch is not None and batch.plan.trims == [(0, 0), (1, 0)]


def test_a_sampler_rides_with_the_first_step_of_its_job() -> None:
    s = Scheduler(n_batch=8)
    spec = SamplerSpec(
        temperature=0.7, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, seed=1
    )
    s.add(SequenceJob(5, [1, 2], 0, 4, spec, Sink()))
    batch = s.plan()
    assert batch is not None and batch.plan.samplers == {5: spec}


@settings(max_examples=200, deadline=None)
@given(
    prompts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    n_batch=st.integers(1, 32),
    max_new=st.integers(1, 6),
)
def test_every_prompt_token_is_fed_once_in_order_within_the_budget(
    prompts: list[int], n_batch: int, max_new: int
) -> None:
    """Whatever the prompt lengths and budget: no step exceeds n_batch tokens (beyond one per
    decoder), every prompt token is fed exactly once at its own position, and every job
    generates exactly max_new tokens."""
    s = Scheduler(n_batch=max(n_batch, len(prompts)))
    jobs = [job(i, [100 + i] * n, max_new=max_new) for i, n in enumerate(prompts)]
    for j in jobs:
        s.add(j)
    fed: dict[int, list[int]] = {j.seq_id: [] for j in jobs}
    generated = dict.fromkeys(fed, 0)
    for _ in range(10_000):
        batch = s.plan()
        if batch is None:
            break
        plan = batch.plan
        assert plan.n_tokens <= s.n_batch
        for seq, pos, tok in zip(
            plan.seq_ids.tolist(), plan.positions.tolist(), plan.tokens.tolist(), strict=True
        ):
            if tok >= 100:
                fed[seq].append(pos)
        delivery = s.advance(batch, result(batch, [1] * len(batch.rows)), frozenset({EOS}), 0)
        for j in delivery.jobs:
            generated[j.seq_id] += 1
    assert s.active == 0
    assert fed == {j.seq_id: list(range(len(j.prompt))) for j in jobs}
    assert generated == dict.fromkeys(fed, max_new)


def test_a_choice_waits_for_its_leader_then_shares_its_last_row_and_gets_its_cells() -> None:
    """A job with a leader still prefilling does not evaluate the prompt: in the step that feeds
    the leader's last prompt token it samples from that row (its own sampler: ``sample_seqs``),
    and the next step copies the leader's cells to its sequence first, then decodes both."""
    s = Scheduler(4)
    prompt = [5, 6, 7, 8, 9, 10]
    leader, follower = job(0, prompt), job(1, prompt)
    follower.leader = leader
    s.add(leader)
    s.add(follower)
    first = s.plan()
    assert first is not None
    assert first.plan.tokens.tolist() == [5, 6, 7, 8] and first.rows == []  # the leader's first chunk only
    s.advance(first, result(first, []), frozenset({EOS}), 0)
    second = s.plan()
    assert second is not None
    assert second.plan.tokens.tolist() == [9, 10]
    assert second.plan.output_rows.tolist() == [1, 1]
    assert second.plan.sample_seqs is not None and second.plan.sample_seqs.tolist() == [0, 1]
    assert second.rows == [leader, follower]
    s.advance(second, result(second, [20, 21]), frozenset({EOS}), 0)
    third = s.plan()
    assert third is not None
    assert third.plan.copies == [(0, 1)]
    assert third.plan.tokens.tolist() == [20, 21]
    assert third.plan.positions.tolist() == [6, 6]
    assert third.plan.seq_ids.tolist() == [0, 1]


def test_a_choice_whose_leader_is_gone_or_past_its_prompt_evaluates_its_own() -> None:
    s = Scheduler(16)
    prompt = [5, 6, 7]
    leader = job(0, prompt)
    s.add(leader)
    batch = s.plan()
    assert batch is not None
    late = job(1, prompt)
    late.leader = leader
    s.add(late)  # the leader's whole prompt is in the step already planned
    assert late.leader is None
    s.advance(batch, result(batch, [9]), frozenset({EOS}), 0)
    again = s.plan()
    assert again is not None and again.plan.copies == []
    assert 1 in again.plan.seq_ids.tolist() and again.plan.n_prompt_tokens == 3
    s2 = Scheduler(2)
    lead2, follow2 = job(0, prompt), job(1, prompt)
    follow2.leader = lead2
    s2.add(lead2)
    s2.add(follow2)
    s2.remove(0)  # cancelled before its prompt was in
    assert follow2.leader is None
    step = s2.plan()
    assert step is not None and step.plan.seq_ids.tolist() == [1, 1]
