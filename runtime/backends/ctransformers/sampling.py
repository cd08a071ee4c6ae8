"""Sampling one token from a row of logits with numpy, in llama.cpp's sampler-chain order.

ctransformers' own sampler reseeds its generator on every token (from the current second
when the seed is -1), so the ctransformers backend samples here instead, with one numpy
Generator per request seeded from ``SamplerSpec.seed``. The chain is llama.cpp's (the one the
llama_cpp backend builds): repetition, frequency and presence penalties over the tokens this
sampler produced, top-k, top-p, min-p, temperature, then a draw from the softmax. Temperature 0
takes the argmax after the penalties.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import numpy.typing as npt

from runtime.backends.base import SamplerSpec

__all__ = ["TokenSampler", "greedy_token"]


def greedy_token(logits: npt.NDArray[np.float32]) -> int:
    """The most likely token of one row of logits, shape (n_vocab,)."""
    return int(np.argmax(logits))


class TokenSampler:
    """The sampler of one request: its spec, its Generator and the tokens it has produced."""

    def __init__(self, spec: SamplerSpec) -> None:
        self.spec = spec
        self._rng = np.random.default_rng(spec.seed)
        self._recent: collections.deque[int] = collections.deque(maxlen=max(spec.repeat_last_n, 0))

    def sample(self, logits: npt.NDArray[np.float32]) -> int:
        """Draw the next token from ``logits`` (shape (n_vocab,)) and remember it for the penalty."""
        spec = self.spec
        z = logits.astype(np.float64)
        if self._recent and (spec.repeat_penalty != 1.0 or spec.frequency_penalty or spec.presence_penalty):
            counts = collections.Counter(self._recent)
            seen = np.fromiter(counts, dtype=np.int64)
            values = z[seen]
            values = np.where(values <= 0, values * spec.repeat_penalty, values / spec.repeat_penalty)
            times = np.fromiter(counts.values(), dtype=np.float64)
            z[seen] = values - times * spec.frequency_penalty - spec.presence_penalty  # llama.cpp's order
        token = int(np.argmax(z)) if spec.temperature == 0 else self._draw(z)
        self._recent.append(token)
        return token

    def _draw(self, z: npt.NDArray[np.float64]) -> int:
        spec = self.spec
        ids = np.arange(z.shape[0])
        if 0 < spec.top_k < z.shape[0]:
            ids = np.argpartition(-z, spec.top_k - 1)[: spec.top_k]
        order = np.argsort(-z[ids], kind="stable")
        ids = ids[order]
        z = z[ids]  # now sorted, most likely first
        if spec.top_p < 1.0:
            cumulative = np.cumsum(_softmax(z))
            keep = int(np.searchsorted(cumulative, spec.top_p)) + 1
            ids, z = ids[:keep], z[:keep]
        if spec.min_p > 0.0:
            keep = max(1, int(np.count_nonzero(z >= z[0] + math.log(spec.min_p))))
            ids, z = ids[:keep], z[:keep]
        probs = _softmax(z / spec.temperature)
        return int(ids[int(self._rng.choice(probs.shape[0], p=probs))])


def _softmax(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(z - z.max())
    probs: npt.NDArray[np.float64] = e / e.sum()
    return probs
