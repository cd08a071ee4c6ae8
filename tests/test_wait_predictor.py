"""The predicted wait (runtime.core.wait_predictor), pure: measured rates in, starts out; and
the tenant weights setting."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.core.config import RuntimeConfig, parse_weights
from runtime.core.errors import ConfigError
from runtime.core.wait_predictor import WaitPredictor, Work


def measured(step_s: float = 0.01) -> WaitPredictor:
    p = WaitPredictor()
    p.observe_step(step_s, n_tokens=2, n_prompt_tokens=0, n_sequences=2)
    return p


def test_nothing_is_predicted_before_a_step_is_measured() -> None:
    p = WaitPredictor()
    assert not p.ready
    p.observe_step(0.01, n_tokens=64, n_prompt_tokens=64, n_sequences=1)  # a prompt step: the prefill rate
    assert not p.ready and p.prefill_s_per_token == pytest.approx(0.01 / 64)
    p.observe_step(0.01, n_tokens=2, n_prompt_tokens=0, n_sequences=2)
    assert p.ready and p.step_s == 0.01


def test_the_queue_is_played_forward_over_the_slots() -> None:
    p = measured(0.01)
    p.prefill_steps = 1.0
    work = Work(prompt_tokens=0, decode_tokens=10)  # 1 step to the first token, 9 more: 0.1 s
    assert p.duration_s(work) == pytest.approx(0.1)
    # 2 slots, running requests free at 0.05 s and 0.2 s; three queued of 0.1 s each
    starts = p.starts(2, [0.2, 0.05], [work, work, work])
    assert starts == pytest.approx([0.05, 0.15, 0.2, 0.25])
    assert p.starts(3, [0.2], [work, work]) == pytest.approx([0.0, 0.0, 0.1])  # idle slots start at once


def test_the_rates_learn_from_finished_requests() -> None:
    p = measured(0.01)
    for _ in range(50):
        p.observe_request(
            prompt_chars=300, prompt_tokens=100, evaluated=100, prefill_s=0.03, decode_s=0.18, generated=10,
            max_new=40,
        )  # fmt: skip
    assert p.chars_per_token == pytest.approx(3.0, rel=1e-3)
    assert p.used_fraction == pytest.approx(0.25, rel=1e-3)
    assert p.interval_per_step == pytest.approx(2.0, rel=1e-3)  # 20 ms between tokens at 10 ms steps
    assert p.prefill_steps == pytest.approx(3.0, rel=1e-3)  # no prompt-step rate yet: all of it in steps
    work = p.work(300, 40)
    assert [work.prompt_tokens, work.decode_tokens] == pytest.approx([100.0, 10.0], rel=1e-3)


@given(
    slots=st.integers(1, 8),
    running=st.lists(st.floats(0, 10), max_size=10),
    queued=st.lists(st.tuples(st.floats(0, 1000), st.floats(1, 500)), max_size=20),
    step_s=st.floats(0.001, 0.1),
)
def test_predicted_starts_never_go_back_and_idle_slots_start_at_once(
    slots: int, running: list[float], queued: list[tuple[float, float]], step_s: float
) -> None:
    p = measured(step_s)
    starts = p.starts(slots, running, [Work(a, b) for a, b in queued])
    assert len(starts) == len(queued) + 1
    assert all(b >= a for a, b in itertools.pairwise(starts))
    idle = max(0, slots - len(running))
    assert all(s == 0.0 for s in starts[: min(idle, len(queued))])


def test_tenant_weights_are_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_weights(" web=3, batch=0.5 ,") == {"web": 3.0, "batch": 0.5}
    monkeypatch.setenv("SLOTSERVE_TENANT_WEIGHTS", "a=2")
    assert RuntimeConfig.load().weights == {"a": 2.0}
    for bad in ("web", "web=0", "=3", "web=x", "web=-1"):
        with pytest.raises(ConfigError, match="tenant_weights has"):
            parse_weights(bad)
    with pytest.raises(ConfigError, match="tenant_max_slots is 2000"):
        RuntimeConfig(tenant_max_slots=2000)


@given(
    works=st.lists(st.tuples(st.floats(0, 1000), st.floats(0, 500)), max_size=20),
    elapsed=st.floats(0, 5),
    prefill_steps=st.floats(0, 3),
)
def test_the_bulk_durations_are_the_single_ones(
    works: list[tuple[float, float]], elapsed: float, prefill_steps: float
) -> None:
    p = measured(0.01)
    p.prefill_steps, p.prefill_s_per_token, p.interval_per_step = prefill_steps, 1e-4, 1.5
    each = [Work(a, b) for a, b in works]
    assert p.durations_s(each) == [p.duration_s(w) for w in each]
    assert p.remainings_s(each, [elapsed] * len(each)) == [p.remaining_s(w, elapsed) for w in each]
