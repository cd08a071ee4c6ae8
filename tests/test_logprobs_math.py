"""The bulk log-probabilities alone (runtime.backends.logprobs), against a plain reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.backends.logprobs import GROUP, step_logprobs


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 6),
    n_vocab=st.sampled_from([1, 7, GROUP, GROUP + 1, 20 * GROUP - 3, 5000]),
    k=st.integers(0, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_equals_log_softmax_and_a_full_sort(m: int, n_vocab: int, k: int, seed: int) -> None:
    """Each chosen token's value is its log-softmax; the top k are the k largest, in order, with
    theirs; every value is <= 0."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((m, n_vocab)) * 4).astype(np.float32)
    chosen = rng.integers(0, n_vocab, m).astype(np.int32)
    got = step_logprobs(np.arange(m, dtype=np.int32), logits, chosen, k)
    wide = logits.astype(np.float64)
    log_z = np.log(np.exp(wide - wide.max(axis=1, keepdims=True)).sum(axis=1)) + wide.max(axis=1)
    assert np.allclose(got.chosen, wide[np.arange(m), chosen] - log_z, atol=1e-4)
    want = np.argsort(-wide, axis=1, kind="stable")[:, : min(k, n_vocab)]
    assert got.top_ids.tolist() == want.tolist()
    assert np.allclose(got.top_logprobs, np.take_along_axis(wide, want, axis=1) - log_z[:, None], atol=1e-4)
    assert (got.chosen <= 1e-6).all() and (got.top_logprobs <= 1e-6).all()
