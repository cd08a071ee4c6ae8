"""The prefill budget (actors.budget) alone, and the scheduler's steps under it: no model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.budget import MIN_CHUNK_TOKENS, PrefillBudget
from actors.scheduler import Scheduler
from tests.test_scheduler import job


def test_a_token_cap_spreads_a_long_prompt_while_others_decode() -> None:
    """Three sequences decode; a 1,500-token prompt comes: each step carries the three decodes
    and at most 100 prompt tokens, until the prompt is in; alone, a prompt is not capped."""
    s = Scheduler(512, budget=PrefillBudget(512, budget_tokens=100))
    decoders = [job(i, [1, 2, 3]) for i in range(3)]
    for d in decoders:
        s.add(d)
    first = s.plan()
    assert first is not None and first.plan.n_prompt_tokens == 9  # nobody decodes yet: no cap
    for d in decoders:
        d.next_token = 5
    long = job(3, list(range(1500)))
    s.add(long)
    steps = 0
    while long.prefilling:
        batch = s.plan()
        assert batch is not None
        assert batch.plan.n_prompt_tokens <= 100 and batch.plan.n_tokens - batch.plan.n_prompt_tokens == 3
        steps += 1
    assert steps == 15 and s.budget is not None and s.budget.capped_steps == 14


def test_the_time_cap_follows_the_measured_steps() -> None:
    """Decode steps of 10 ms and 1 ms a prompt token, a 50 ms budget: 40 prompt tokens fit,
    raised to the least chunk; at 0.1 ms a token, 400; unmeasured, the least chunk."""
    b = PrefillBudget(512, budget_s=0.05)
    assert b.limit(3) == MIN_CHUNK_TOKENS
    b.observe(0, 3, 0.010)
    b.observe(200, 3, 0.010 + 200 * 0.001)
    assert b.limit(3) == MIN_CHUNK_TOKENS
    fast = PrefillBudget(512, budget_s=0.05)
    fast.observe(0, 3, 0.010)
    fast.observe(200, 0, 200 * 0.0001)
    assert fast.limit(3) == 400
    assert fast.limit(0) == 512  # nobody decodes: the whole batch


@given(
    n_decode=st.integers(0, 600),
    steps=st.lists(st.tuples(st.integers(0, 512), st.integers(0, 64), st.floats(0, 2)), max_size=20),
    budget_s=st.floats(0, 1),
    budget_tokens=st.integers(0, 1000),
)
def test_the_limit_stays_inside_the_batch(
    n_decode: int, steps: list[tuple[int, int, float]], budget_s: float, budget_tokens: int
) -> None:
    b = PrefillBudget(512, budget_s=budget_s, budget_tokens=budget_tokens)
    for step in steps:
        b.observe(*step)
    limit = b.limit(n_decode)
    room = 512 - n_decode
    assert 0 <= limit <= max(room, 0)
    if room >= 1:
        assert limit >= 1  # a prompt always moves
    if n_decode and budget_tokens and room > 1:
        assert limit <= budget_tokens


def test_negative_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        PrefillBudget(512, budget_s=-1)
