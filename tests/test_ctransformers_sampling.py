"""The numpy sampler the ctransformers backend uses (llama.cpp's chain order, per-request seed)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from runtime.backends.base import SamplerSpec
from runtime.backends.ctransformers.sampling import TokenSampler

LOGITS = arrays(np.float32, st.integers(2, 200), elements=st.floats(-20, 20, width=32))


def spec(**kw: float) -> SamplerSpec:
    base: dict[str, float] = {
        "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
        "repeat_penalty": 1.0, "repeat_last_n": 64, "seed": 1,
    }  # fmt: skip
    return SamplerSpec(**{**base, **kw})  # type: ignore[arg-type]


def first_max(logits: npt.NDArray[np.float32]) -> set[int]:
    return set(np.flatnonzero(logits == logits.max()).tolist())


@given(LOGITS, st.integers(0, 2**32 - 1), st.floats(0.05, 5))
def test_top_k_1_min_p_1_and_temperature_0_take_the_most_likely(
    logits: npt.NDArray[np.float32], seed: int, temperature: float
) -> None:
    best = first_max(logits)
    assert TokenSampler(spec(top_k=1, seed=seed, temperature=temperature)).sample(logits) in best
    assert TokenSampler(spec(min_p=1.0, top_k=0, seed=seed, temperature=temperature)).sample(logits) in best
    assert TokenSampler(spec(temperature=0, seed=seed)).sample(logits) in best


@given(LOGITS, st.integers(1, 10), st.integers(0, 2**32 - 1))
def test_a_token_outside_the_top_k_is_never_drawn(logits: npt.NDArray[np.float32], k: int, seed: int) -> None:
    token = TokenSampler(spec(top_k=k, top_p=1.0, min_p=0.0, temperature=2.0, seed=seed)).sample(logits)
    assert np.count_nonzero(logits > logits[token]) < k


@given(LOGITS, st.integers(0, 2**32 - 1))
@settings(max_examples=50)
def test_the_same_seed_draws_the_same_tokens(logits: npt.NDArray[np.float32], seed: int) -> None:
    a, b = TokenSampler(spec(seed=seed, temperature=1.5)), TokenSampler(spec(seed=seed, temperature=1.5))
    assert [a.sample(logits) for _ in range(8)] == [b.sample(logits) for _ in range(8)]


def test_draws_follow_the_softmax() -> None:
    probs = np.array([0.5, 0.3, 0.2])
    sampler = TokenSampler(spec(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3))
    draws = np.bincount([sampler.sample(np.log(probs).astype(np.float32)) for _ in range(4000)], minlength=3)
    assert np.allclose(draws / 4000, probs, atol=0.03)


def test_the_repeat_penalty_applies_to_what_this_sampler_produced() -> None:
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    penalised = TokenSampler(spec(temperature=0, repeat_penalty=1.5, repeat_last_n=4))
    # 0 first; then 2.0/1.5 = 1.33 < 1.9, so 1; then 1.33 > 1.9/1.5 = 1.27, so 0 again
    assert [penalised.sample(logits) for _ in range(3)] == [0, 1, 0]
    plain = TokenSampler(spec(temperature=0))
    assert [plain.sample(logits) for _ in range(3)] == [0, 0, 0]
