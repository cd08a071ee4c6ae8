"""Constrained rows of a step: llguidance matchers, their token masks in bulk, their advance.

A request with an output constraint (runtime.core.structured) gets a matcher: its grammar
compiled against the backend's vocabulary once per distinct grammar (cached, then copied per
request: ``LLMatcher.deep_copy``). Each step, :meth:`GrammarRows.mask` computes the masks of
every constrained row at once (``LLExecutor``, in parallel, into one bitmask) and sets the
logits of the tokens a row may not take to -inf in place, so that argmax and llama.cpp's
sampler chains both choose among allowed tokens only; :meth:`GrammarRows.advance` then feeds
each row its token. Rows without a matcher cost nothing: a step with none skips all of this.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import llguidance
import llguidance.numpy as lln
import numpy as np
import numpy.typing as npt

from runtime.core.errors import GenerationError, InvalidRequestError

__all__ = ["GrammarRows", "byte_tokenizer"]

_CACHE_SIZE = 64
"""Compiled grammars kept (least recently used dropped first)."""


def byte_tokenizer(pieces: Sequence[bytes], eos: int, encode: Callable[[bytes], list[int]]) -> Any:
    """An llguidance tokenizer of ``pieces`` (token id -> bytes) whose end is ``eos``."""

    class _Vocab:
        eos_token_id = eos
        bos_token_id = None

        def __init__(self) -> None:
            self.tokens = [b"\xff<eos>" if t == eos else p for t, p in enumerate(pieces)]

        def __call__(self, data: bytes) -> list[int]:
            return encode(data)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()))


class GrammarRows:
    """The matchers of one context's sequences (seq_id -> matcher), on the step loop's thread.

    :param tokenizer: a callable that makes the llguidance tokenizer, on first use (building
        one reads the whole vocabulary: a fraction of a second).
    :param n_vocab: logits per row.
    """

    def __init__(self, tokenizer: Callable[[], Any], n_vocab: int) -> None:
        self._make_tokenizer = tokenizer
        self._tokenizer: Any = None
        self._executor: Any = None
        self.n_vocab = n_vocab
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self.matchers: dict[int, Any] = {}
        self.compiles = 0
        """Grammars compiled (a cache miss each)."""
        self.mask_seconds = 0.0
        """Time spent computing and applying masks (the step loop's thread)."""
        self.masked_rows = 0
        """Rows masked, all steps together."""

    def _prototype(self, grammar: str) -> Any:
        if (m := self._compiled.get(grammar)) is not None:
            self._compiled.move_to_end(grammar)
            return m
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
            self._executor = llguidance.LLExecutor()
        m = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"the output constraint does not compile: {m.get_error()}")
        self.compiles += 1
        self._compiled[grammar] = m
        if len(self._compiled) > _CACHE_SIZE:
            self._compiled.popitem(last=False)
        return m

    def set(self, seq_id: int, grammar: str | None) -> None:
        """Give ``seq_id`` a fresh matcher of ``grammar`` (None: no constraint).

        :raises InvalidRequestError: if the grammar does not compile against this vocabulary.
        """
        self.matchers.pop(seq_id, None)
        if grammar is not None:
            self.matchers[seq_id] = self._prototype(grammar).deep_copy()

    def allowed(self, matchers: list[Any]) -> npt.NDArray[np.bool_]:
        """Shape (len(matchers), n_vocab): the tokens each matcher allows next."""
        mask = lln.allocate_token_bitmask(len(matchers), self.n_vocab)
        lln.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], mask)
        bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, : self.n_vocab]
        return bits.view(np.bool_)

    def mask(
        self, seq_ids: Sequence[int], logits: npt.NDArray[np.float32], rows: npt.NDArray[np.intp]
    ) -> list[int]:
        """Set to -inf, in place, the logits a constrained output may not take.

        :param seq_ids: the sequence whose sampler picks each output.
        :param rows: the logits row of each output.
        :returns: the outputs that are constrained.
        """
        outputs = [i for i, s in enumerate(seq_ids) if s in self.matchers]
        if outputs:
            start = time.perf_counter()
            refused = ~self.allowed([self.matchers[seq_ids[i]] for i in outputs])
            for k, row in enumerate(rows[outputs].tolist()):  # a view per row: no copy of the rows
                logits[row][refused[k]] = -np.inf
            self.mask_seconds += time.perf_counter() - start
            self.masked_rows += len(outputs)
        return outputs

    def advance(self, seq_id: int, token: int) -> None:
        """Feed ``token`` to ``seq_id``'s matcher.

        :raises GenerationError: if the grammar refuses it (a token the mask did not allow).
        """
        m = self.matchers[seq_id]
        if not m.consume_token(token):
            raise GenerationError(f"the output constraint refused token {token}: {m.get_error()}")

    def clear(self) -> None:
        """Drop every matcher (the context closes)."""
        self.matchers.clear()
