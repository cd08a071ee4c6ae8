"""The prefill budget: how many prompt tokens a step that also decodes may carry.

A step decodes one token for every generating sequence and then prompt chunks; a long prompt
fed in one big chunk makes every decoding sequence wait for it (llama.cpp #6607). With a budget
the prompt tokens of a step with decoding sequences are capped: by count
(``prefill_budget_tokens``), and by time (``prefill_budget_s``): the step is predicted to take
at most that long from the steps measured so far (a moving average of the decode-only steps'
seconds and of the seconds per prompt token), so long prompts spread over several steps, as
Sarathi-Serve's and vLLM's chunked prefill do with a token budget. A step with no decoding
sequence is not capped (nobody waits for it). Pure: fed with step timings, no clock of its own.
"""

from __future__ import annotations

__all__ = ["MIN_CHUNK_TOKENS", "PrefillBudget"]

MIN_CHUNK_TOKENS = 64
"""The time cap never goes below this many prompt tokens a step: smaller chunks cost more per
token, and on llama.cpp's CPU backend (flash attention on, its default) a sequence's chunk of
fewer than 64 tokens is computed by another kernel path that rounds differently (see README)."""

_ALPHA = 0.2
"""Weight of the newest step in the moving averages."""
_MIN_MEASURED_TOKENS = 16
"""Steps with fewer prompt tokens than this do not update the seconds per prompt token."""


class PrefillBudget:
    """Prompt tokens allowed in a step beside decoding sequences.

    :param n_batch: tokens one step decodes at most.
    :param budget_s: seconds a step with decoding sequences should take at most (0: no cap by
        time).
    :param budget_tokens: prompt tokens such a step carries at most (0: no cap by count).
    :raises ValueError: if ``budget_s`` or ``budget_tokens`` is negative.
    """

    def __init__(self, n_batch: int, *, budget_s: float = 0.0, budget_tokens: int = 0) -> None:
        if budget_s < 0 or budget_tokens < 0:
            raise ValueError(f"budget_s ({budget_s}) and budget_tokens ({budget_tokens}) must be >= 0")
        self.n_batch = n_batch
        self.budget_s = budget_s
        self.budget_tokens = budget_tokens
        self.decode_step_s: float | None = None
        """Moving average of the seconds of a step that only decodes (None: none seen yet)."""
        self.prompt_token_s: float | None = None
        """Moving average of the seconds one prompt token adds to a step (None: not measured)."""
        self.capped_steps = 0
        """Steps whose prompt tokens the budget cut."""

    @property
    def active(self) -> bool:
        """Whether any cap is set."""
        return self.budget_s > 0 or self.budget_tokens > 0

    def observe(self, n_prompt_tokens: int, n_decode: int, seconds: float) -> None:
        """Learn from a finished step of ``n_prompt_tokens`` prompt tokens and ``n_decode``
        decoding rows that took ``seconds``."""
        if n_prompt_tokens == 0:
            if n_decode:
                d = self.decode_step_s
                self.decode_step_s = seconds if d is None else d + _ALPHA * (seconds - d)
            return
        if n_prompt_tokens < _MIN_MEASURED_TOKENS:
            return
        base = (self.decode_step_s or 0.0) if n_decode else 0.0
        per_token = max(seconds - base, 0.0) / n_prompt_tokens
        p = self.prompt_token_s
        self.prompt_token_s = per_token if p is None else p + _ALPHA * (per_token - p)

    def limit(self, n_decode: int) -> int:
        """Prompt tokens a step with ``n_decode`` decoding rows may carry (at least 1 while
        there is room in the batch)."""
        room = self.n_batch - n_decode
        if n_decode == 0 or room <= 1:
            return max(room, 0)
        cap = room
        if self.budget_tokens:
            cap = min(cap, self.budget_tokens)
        if self.budget_s > 0:
            per_token = self.prompt_token_s
            if per_token is None:  # not measured yet: a small chunk, measured
                by_time = MIN_CHUNK_TOKENS
            elif per_token <= 0:
                by_time = room
            else:
                spare = self.budget_s - (self.decode_step_s or 0.0)
                by_time = max(MIN_CHUNK_TOKENS, int(spare / per_token))
            cap = min(cap, by_time)
        return max(cap, 1)
