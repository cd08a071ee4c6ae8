"""Log-probabilities of a step's sampled tokens, in bulk: one log-softmax over every row that
asked, and a top k found without sorting or partitioning the whole vocabulary (no Python loop
over rows or tokens).

The top k: the vocabulary is cut into groups of :data:`GROUP` tokens (token ``t`` is in group
``t mod n_groups``, so that the maxima are one reduction over contiguous rows); the k groups
with the highest maxima hold every one of the k most likely tokens (each of them lies in a
group whose maximum is at least the k-th value, and at most k groups have such a maximum), so
only those k x GROUP candidates are partitioned. ``argpartition`` over 49,152 logits takes
about 1 ms a row on a CPU; the group maxima of 8 rows about 0.1 ms.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from runtime.backends.base import StepLogprobs

__all__ = ["GROUP", "step_logprobs"]

GROUP = 64
"""Tokens per group of the top-k search."""


def step_logprobs(
    outputs: npt.NDArray[np.int32],
    logits: npt.NDArray[np.float32],
    chosen: npt.NDArray[np.int32],
    k: int,
) -> StepLogprobs:
    """The log-probabilities of ``chosen`` (m,) under the softmax of ``logits`` (m, n_vocab),
    and the ``k`` most likely tokens of each row, most likely first (ties: the lower id first,
    as argmax picks it).

    :param outputs: which outputs of the step the rows are, shape (m,); carried into the result.
    """
    m, n_vocab = logits.shape
    n_groups = -(-n_vocab // GROUP)
    shifted = np.empty((m, n_groups * GROUP), dtype=np.float32)  # padded to whole groups
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=shifted[:, :n_vocab])
    shifted[:, n_vocab:] = -np.inf
    norm = np.log(np.exp(shifted[:, :n_vocab]).sum(axis=1, keepdims=True))  # log partition - peak
    rows = np.arange(m)
    chosen_lp = (shifted[rows, chosen] - norm[:, 0]).astype(np.float32)
    k = min(k, n_vocab)
    if k == 0:
        top_ids = np.empty((m, 0), dtype=np.int32)
        top_lp = np.empty((m, 0), dtype=np.float32)
    else:
        ids, values = _candidates(shifted, n_groups, k)
        if ids.shape[1] > k:
            part = np.argpartition(values, ids.shape[1] - k, axis=1)[:, ids.shape[1] - k :]
            ids, values = np.take_along_axis(ids, part, axis=1), np.take_along_axis(values, part, axis=1)
        order = np.lexsort((ids, -values), axis=1)
        top_ids = np.take_along_axis(ids, order, axis=1).astype(np.int32)
        top_lp = (np.take_along_axis(values, order, axis=1) - norm).astype(np.float32)
    return StepLogprobs(outputs=outputs, chosen=chosen_lp, top_ids=top_ids, top_logprobs=top_lp)


def _candidates(
    shifted: npt.NDArray[np.float32], n_groups: int, k: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Token ids and values, shape (m, c) each, among which each row's top k lie."""
    m, width = shifted.shape
    if n_groups <= k:  # a small vocabulary: every token is a candidate
        return np.broadcast_to(np.arange(width), shifted.shape), shifted
    groups = shifted.reshape(m, GROUP, n_groups)  # token t = i * n_groups + g is in group g
    best = np.argpartition(groups.max(axis=1), n_groups - k, axis=1)[:, n_groups - k :]  # (m, k)
    values = groups[np.arange(m)[:, None], :, best].reshape(m, k * GROUP)
    ids = (best[:, :, None] + n_groups * np.arange(GROUP)).reshape(m, k * GROUP)
    return ids, values
