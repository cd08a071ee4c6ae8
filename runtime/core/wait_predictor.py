"""Predicted wait, pure: from measured rates, when each queued request starts and its TTFT.

The rates are moving averages of what the runtime measured: seconds per decode step at the
batch it runs now, seconds per prompt token in steps that carry a prompt chunk, the steps a
request takes from its slot to its first token besides its prompt's tokens (tokenizing, the
step that samples it), characters per prompt token, and the share of ``max_tokens`` that
requests really generate (most stop before it). A request's expected time in a slot is its
prefill plus its expected tokens times the step time. The start
of a queued request comes from playing the queue forward: each slot frees when its request's
expected time is up, and takes the next request in the queue's order.

No clock here: times are seconds from "now", which the caller passes.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WaitPredictor", "Work"]

_ALPHA = 0.2
"""Weight of the newest measurement in each moving average."""
PREFILL_STEP_TOKENS = 32
"""A step with at least this many prompt tokens (and twice its sequences) measures prefill."""


@dataclass(frozen=True, slots=True)
class Work:
    """What one request is expected to cost: prompt tokens to evaluate and tokens to generate."""

    prompt_tokens: float
    decode_tokens: float


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _ALPHA * (new - old)


class WaitPredictor:
    """Moving averages of the measured rates, and the predictions made from them."""

    def __init__(self) -> None:
        self.step_s: float | None = None
        """Seconds per decode step at the current batch (None: no step measured yet)."""
        self.prefill_s_per_token = 0.0
        """Seconds per token of steps that carry a prompt chunk (0 until one ran)."""
        self.prefill_steps = 1.0
        """Steps from a slot taking a request to its first token, beyond its prompt's tokens."""
        self.chars_per_token = 4.0
        """Prompt characters per token (before any request finished: 4, English's rule of thumb)."""
        self.used_fraction = 1.0
        """Tokens generated / max_tokens (1 until a request finished)."""
        self.interval_per_step = 1.0
        """A request's time between two tokens over the step time (above 1: the time between
        steps, the event loop's turn; 1 until a request finished)."""

    @property
    def ready(self) -> bool:
        """Whether a step has been measured (before that nothing is predicted)."""
        return self.step_s is not None

    def observe_step(self, seconds: float, n_tokens: int, n_prompt_tokens: int, n_sequences: int) -> None:
        """One step took ``seconds`` for ``n_tokens`` tokens of ``n_sequences`` sequences, of
        which ``n_prompt_tokens`` prompt tokens: a step mostly of prompt gives the prefill rate,
        any other the decode step time."""
        if seconds <= 0 or n_tokens <= 0:
            return
        if n_prompt_tokens >= max(PREFILL_STEP_TOKENS, 2 * n_sequences):
            self.prefill_s_per_token = _ewma(self.prefill_s_per_token or None, seconds / n_tokens)
        else:
            self.step_s = _ewma(self.step_s, seconds)

    def observe_request(
        self,
        *,
        prompt_chars: int,
        prompt_tokens: int,
        evaluated: int,
        prefill_s: float,
        decode_s: float,
        generated: int,
        max_new: int,
    ) -> None:
        """A request ended: its prompt's characters and tokens, the tokens evaluated (not
        cached), its prefill and decode seconds, the tokens generated and the most it could have."""
        if prompt_tokens > 0 and prompt_chars > 0:
            self.chars_per_token = _ewma(self.chars_per_token, prompt_chars / prompt_tokens)
        if self.step_s:
            steps = max(0.0, prefill_s - evaluated * self.prefill_s_per_token) / self.step_s
            self.prefill_steps = _ewma(self.prefill_steps, steps)
        if max_new > 0:
            self.used_fraction = _ewma(self.used_fraction, min(1.0, generated / max_new))
        if generated > 1 and self.step_s:
            ratio = decode_s / (generated - 1) / self.step_s
            self.interval_per_step = _ewma(self.interval_per_step, min(max(ratio, 0.5), 10.0))

    def work(self, prompt_chars: int, max_tokens: int) -> Work:
        """The expected work of a request of ``prompt_chars`` characters and ``max_tokens``."""
        return Work(prompt_chars / self.chars_per_token, max_tokens * self.used_fraction)

    def prefill_s(self, work: Work) -> float:
        """Seconds from a slot taking the request to its first token."""
        return self.prefill_steps * (self.step_s or 0.0) + work.prompt_tokens * self.prefill_s_per_token

    def duration_s(self, work: Work) -> float:
        """Seconds the request is expected to hold its slot."""
        return self.prefill_s(work) + max(0.0, work.decode_tokens - 1) * self.token_interval_s

    @property
    def token_interval_s(self) -> float:
        """Seconds between two tokens of one request: the step time, as requests see it."""
        return (self.step_s or 0.0) * self.interval_per_step

    def durations_s(self, works: Sequence[Work]) -> list[float]:
        """:meth:`duration_s` of each of ``works``, in bulk (the rates read once, not per request)."""
        base, per_token = self.prefill_steps * (self.step_s or 0.0), self.prefill_s_per_token
        interval = self.token_interval_s
        return [base + w.prompt_tokens * per_token + max(0.0, w.decode_tokens - 1) * interval for w in works]

    def remaining_s(self, work: Work, elapsed_s: float) -> float:
        """Seconds a running request is expected to hold its slot still (at least one step)."""
        return max(self.duration_s(work) - elapsed_s, self.step_s or 0.0)

    def remainings_s(self, works: Sequence[Work], elapsed_s: Sequence[float]) -> list[float]:
        """:meth:`remaining_s` of each running request (``works[i]`` in its slot for
        ``elapsed_s[i]`` seconds), in bulk."""
        least = self.step_s or 0.0
        return [max(d - e, least) for d, e in zip(self.durations_s(works), elapsed_s, strict=True)]

    def starts(self, slots: int, running_s: Sequence[float], queued: Sequence[Work]) -> list[float]:
        """When each of ``queued`` (in the order the queue serves them) is predicted to start,
        in seconds from now, given ``slots`` slots and the remaining seconds of each running
        request (``running_s``); one value more at the end: when the next slot frees after them."""
        free = sorted(running_s)[:slots] + [0.0] * max(0, slots - len(running_s))
        if not free:
            return [float("inf")] * (len(queued) + 1)
        heapq.heapify(free)
        out: list[float] = []
        for duration in self.durations_s(queued):
            start = free[0]  # the first slot to free takes the next request, and frees again after it
            out.append(start)
            heapq.heapreplace(free, start + duration)
        out.append(free[0])
        return out
