"""The cells of each ctransformers sequence, kept on the parent's side of the worker process.

An instance of the library holds one sequence and evaluates from an explicit position, so
"removing cells" is only a matter of where the next evaluation starts. This book records the
tokens at every position of every sequence, and how many of them the current worker's
instance really holds; after a worker dies, the first evaluation of a sequence re-evaluates
its missing tokens first (a replay), so that its cells are what the runtime believes them to be.
"""

from __future__ import annotations

import numpy as np

from runtime.backends.base import StepPlan

__all__ = ["Eval", "SequenceCells"]

Eval = tuple[int, int, list[int], bool]
"""(seq_id, n_past, tokens to evaluate from position n_past, sample the last one?)."""


class SequenceCells:
    """Tokens by position for each sequence of ``instances`` instances of ``n_ctx`` cells."""

    def __init__(self, n_ctx: int, instances: int) -> None:
        self.n_ctx = n_ctx
        self.instances = instances
        self._tokens: dict[int, list[int]] = {}
        self._in_worker: dict[int, int] = {}
        self.replayed = 0
        """Tokens evaluated again so far to rebuild cells a dead worker had held."""

    def held(self, seq_id: int) -> int:
        """Cells the sequence holds (a plain read: safe from any thread, takes no lock)."""
        return len(self._tokens.get(seq_id, ()))

    def trim(self, seq_id: int, p0: int) -> None:
        """Drop the sequence's cells at positions >= ``p0``."""
        del self._tokens.setdefault(seq_id, [])[p0:]
        if seq_id in self._in_worker:
            self._in_worker[seq_id] = min(self._in_worker[seq_id], p0)

    def worker_lost(self) -> None:
        """The worker's instances are gone (or unsure): every sequence is rebuilt on next use."""
        self._in_worker = {}

    def keep_below(self, n_seq: int) -> int:
        """Forget the sequences from ``n_seq`` on; return the cells the others hold."""
        for seq_id in [s for s in self._tokens if s >= n_seq]:
            del self._tokens[seq_id]
            self._in_worker.pop(seq_id, None)
        self.instances = n_seq
        return sum(len(t) for t in self._tokens.values())

    def evals(self, plan: StepPlan) -> tuple[list[Eval], dict[int, list[int]]]:
        """The evaluations ``plan`` needs, one per sequence in order of first appearance (any
        replay in front), and the new tokens of each sequence (for :meth:`commit`).

        :raises RuntimeError: if a sequence has no instance, its positions do not continue its
            cells, it would run past ``n_ctx``, or a row other than its last is to be sampled
            (an instance yields logits for its last token only).
        """
        seq_ids = plan.seq_ids
        firsts = np.unique(seq_ids, return_index=True)[1]
        outputs = set(plan.output_rows.tolist())
        evals: list[Eval] = []
        new_tokens: dict[int, list[int]] = {}
        for seq_id in seq_ids[np.sort(firsts)].tolist():
            if not 0 <= seq_id < self.instances:
                raise RuntimeError(f"sequence {seq_id} has no instance; there are {self.instances}")
            rows = np.flatnonzero(seq_ids == seq_id)
            positions = plan.positions[rows]
            p0, n = int(positions[0]), int(rows.shape[0])
            held = self._tokens.setdefault(seq_id, [])
            if p0 != len(held) or np.any(positions != np.arange(p0, p0 + n)):
                raise RuntimeError(
                    f"sequence {seq_id}: positions {positions.tolist()[:3]}... do not continue its {len(held)} cells"
                )
            if p0 + n > self.n_ctx:
                raise RuntimeError(
                    f"sequence {seq_id}: {p0 + n:,} tokens would pass n_ctx_per_slot ({self.n_ctx:,})"
                )
            sampled = [r for r in rows.tolist() if r in outputs]
            if sampled and sampled != [int(rows[-1])]:
                raise RuntimeError(f"sequence {seq_id}: an instance yields logits for its last token only")
            start = self._in_worker.get(seq_id, 0)
            replay = held[start:p0]
            self.replayed += len(replay)
            tokens = plan.tokens[rows].tolist()
            new_tokens[seq_id] = tokens
            evals.append((seq_id, start, replay + tokens, bool(sampled)))
        return evals, new_tokens

    def commit(self, new_tokens: dict[int, list[int]]) -> None:
        """The worker evaluated ``new_tokens``: they are cells now, in the worker too."""
        for seq_id, tokens in new_tokens.items():
            held = self._tokens[seq_id]
            held += tokens
            self._in_worker[seq_id] = len(held)
