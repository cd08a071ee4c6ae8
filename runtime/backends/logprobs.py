"""Log-probabilities of a step's sampled tokens, in bulk: one log-softmax over every row that
asked, and one ``argpartition`` for their top k (no Python loop over rows or the vocabulary)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from runtime.backends.base import StepLogprobs

__all__ = ["step_logprobs"]


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
    peak = logits.max(axis=1, keepdims=True)
    shifted = logits - peak
    norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # log of the partition, minus peak
    rows = np.arange(m)
    chosen_lp = (shifted[rows, chosen] - norm[:, 0]).astype(np.float32)
    k = min(k, n_vocab)
    if k == 0:
        top_ids = np.empty((m, 0), dtype=np.int32)
        top_lp = np.empty((m, 0), dtype=np.float32)
    else:
        if k < n_vocab:
            part = np.argpartition(shifted, n_vocab - k, axis=1)[:, n_vocab - k :]
        else:
            part = np.tile(np.arange(n_vocab), (m, 1))
        values = np.take_along_axis(shifted, part, axis=1)
        order = np.lexsort((part, -values), axis=1)
        top_ids = np.take_along_axis(part, order, axis=1).astype(np.int32)
        top_lp = (np.take_along_axis(values, order, axis=1) - norm).astype(np.float32)
    return StepLogprobs(outputs=outputs, chosen=chosen_lp, top_ids=top_ids, top_logprobs=top_lp)
