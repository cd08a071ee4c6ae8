"""Section 1, the limit: N sequences batched in one llama.cpp context, no runtime around it.

A plain loop on llama-cpp-python's low-level API, the fastest a Python program can drive
llama.cpp: one ``llama_batch`` filled from numpy arrays, one ``llama_decode`` a step, one
argmax over every row's logits. All prompts are evaluated in the first batch; each sequence
then decodes greedily until an end-of-generation token or ``max_tokens``, as slotserve does.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.bench.workload import PassFigures, Workload

__all__ = ["PlainLoop"]


class PlainLoop:
    """One model and one context of ``n_seq`` sequences, driven by a plain loop.

    :param path: the GGUF file.
    :raises RuntimeError: if llama.cpp cannot load the model or create the context.
    """

    def __init__(self, path: Path, n_seq: int, workload: Workload) -> None:
        import llama_cpp as llama

        from runtime.backends.llama_cpp import NumpyBatch, context_params, load_weights

        self._llama = llama
        self._model = load_weights(path, workload.gpu_layers)  # llama.cpp's log as for slotserve
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {str(path)!r}")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self._eog = np.array(
            [llama.llama_vocab_is_eog(self._vocab, t) for t in range(self._n_vocab)], dtype=bool
        )
        cparams = context_params(
            n_ctx_per_slot=workload.n_ctx_per_slot, n_seq=n_seq, n_batch=workload.n_batch,
            n_threads=workload.n_threads,
        )  # fmt: skip
        n_batch = cparams.n_batch
        self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context of {n_seq} sequences")
        self._mem = llama.llama_get_memory(self._ctx)
        self.n_seq = n_seq
        self._capacity = n_batch
        self._batch = NumpyBatch(n_batch)  # the runtime's own batch arrays: the fastest fill there is

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, BOS added if the model wants one (as slotserve tokenizes)."""
        data = text.encode()
        buf = (self._llama.llama_token * (len(data) + 8))()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, len(buf), True, True)
        return list(buf[:n])

    def _decode(self, n: int, n_out: int) -> npt.NDArray[np.int32]:
        """Decode the first ``n`` rows of the batch; return the argmax of the ``n_out`` outputs."""
        self._batch.struct.n_tokens = n
        rc = self._llama.llama_decode(self._ctx, self._batch.struct)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {n} tokens")
        if n_out == 0:
            return np.empty(0, dtype=np.int32)
        logits = np.ctypeslib.as_array(self._llama.llama_get_logits(self._ctx), shape=(n_out, self._n_vocab))
        sampled: npt.NDArray[np.int32] = np.argmax(logits, axis=1).astype(np.int32)
        return sampled

    def _prefill(self, prompts: list[list[int]], start: float) -> tuple[npt.NDArray[np.int32], list[float]]:
        """Evaluate every prompt, in batches of at most the batch capacity; return each
        sequence's first token and its TTFT (seconds from ``start``)."""
        n = len(prompts)
        lengths = [len(p) for p in prompts]
        tokens = np.concatenate([np.asarray(p, dtype=np.int32) for p in prompts])
        pos = np.concatenate([np.arange(k, dtype=np.int32) for k in lengths])
        seq = np.repeat(np.arange(n, dtype=np.int32), lengths)
        last = np.zeros(len(tokens), dtype=bool)
        last[np.cumsum(lengths) - 1] = True
        first = np.empty(n, dtype=np.int32)
        ttft = [0.0] * n
        for lo in range(0, len(tokens), self._capacity):
            hi = min(len(tokens), lo + self._capacity)
            k = hi - lo
            self._batch.tokens[:k] = tokens[lo:hi]
            self._batch.pos[:k] = pos[lo:hi]
            self._batch.seq[:k] = seq[lo:hi]
            self._batch.logits[:k] = last[lo:hi]
            done = seq[lo:hi][last[lo:hi]]
            first[done] = self._decode(k, len(done))
            now = time.perf_counter()
            for s in done.tolist():
                ttft[s] = now - start
        return first, ttft

    def run(self, prompts: list[list[int]], max_tokens: int) -> tuple[PassFigures, list[list[int]]]:
        """Generate for every prompt at once (one sequence each, greedy): the prompts first, in
        batches of up to ``n_batch`` tokens, then one token per sequence a step.

        :returns: the figures (TTFT from the start of the pass) and each sequence's tokens.
        :raises ValueError: if there are more prompts than sequences.
        """
        n = len(prompts)
        if n > self.n_seq:
            raise ValueError(f"{n} prompts; the context holds {self.n_seq} sequences")
        self._llama.llama_memory_clear(self._mem, True)
        start = time.perf_counter()
        sampled, ttft = self._prefill(prompts, start)
        last = time.perf_counter()
        itl: list[float] = []
        out = np.zeros((n, max_tokens), dtype=np.int32)
        out[:, 0] = sampled
        lengths = np.ones(n, dtype=np.int64)
        seqs = np.arange(n, dtype=np.int32)
        pos = np.array([len(p) for p in prompts], dtype=np.int32)
        alive = ~self._eog[sampled] & (lengths < max_tokens)
        self._batch.logits[:n] = 1
        while alive.any():
            seqs, pos, sampled = seqs[alive], pos[alive], sampled[alive]
            k = len(seqs)
            self._batch.tokens[:k] = sampled
            self._batch.pos[:k] = pos
            self._batch.seq[:k] = seqs
            sampled = self._decode(k, k)
            now = time.perf_counter()
            itl.extend([now - last] * k)
            last = now
            pos = pos + 1
            out[seqs, lengths[seqs]] = sampled
            lengths[seqs] += 1
            alive = ~self._eog[sampled] & (lengths[seqs] < max_tokens)
        wall = time.perf_counter() - start
        figures = PassFigures.of(n, int(lengths.sum()), wall, ttft, itl)
        return figures, [out[i, : lengths[i]].tolist() for i in range(n)]

    def close(self) -> None:
        """Free the context and the weights."""
        if self._ctx:
            self._llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None
