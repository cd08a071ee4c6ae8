"""Does llama.cpp give the same logits for the same tokens decoded in other chunks?

The same 600 tokens go into one sequence in several chunkings (llama-cpp-python's low-level
API, one ``llama_decode`` per chunk, nothing of slotserve's runtime); the last token's logits
are compared with those of a 512 + 88 decode. Then one decode step of one sequence alone
against the same step beside other sequences. With flash attention on and off.

Run alone: ``python -m runtime.bench.chunking [--out chunking.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import llama_cpp as llama
import numpy as np

from runtime.backends.base import StepPlan
from runtime.backends.llama_cpp import NumpyBatch, context_params, load_weights
from runtime.backends.model_files import resolve_model

__all__ = ["measure_chunking"]

CHUNKINGS = ([300, 300], [100] * 6, [256, 256, 88], [64, 448, 88], [56, 456, 88], [32, 480, 88],
             [2, 510, 88], [511, 1, 88])  # fmt: skip


class _Context:
    """One llama.cpp context of 4 sequences on ``weights``; decodes plain lists of rows."""

    def __init__(self, weights: Any, flash: int, threads: int, n_vocab: int) -> None:
        cparams = context_params(n_ctx_per_slot=1024, n_seq=4, n_batch=512, n_threads=threads)
        cparams.flash_attn_type = flash
        self.ctx = llama.llama_init_from_model(weights, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.mem, self.batch, self.n_vocab = llama.llama_get_memory(self.ctx), NumpyBatch(512), n_vocab

    def decode(self, toks: list[int], pos: list[int], seqs: list[int], outs: list[int]) -> np.ndarray:
        plan = StepPlan(
            tokens=np.array(toks, np.int32), positions=np.array(pos, np.int32),
            seq_ids=np.array(seqs, np.int32), output_rows=np.array(outs, np.int32),
        )  # fmt: skip
        self.batch.fill(plan)
        if (rc := llama.llama_decode(self.ctx, self.batch.struct)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n = len(outs) * self.n_vocab
        logits = np.ctypeslib.as_array(llama.llama_get_logits(self.ctx), shape=(n,))
        return logits.reshape(-1, self.n_vocab).copy()

    def chunked(self, seq: int, tokens: list[int], sizes: list[int]) -> np.ndarray:
        """The last token's logits after decoding ``tokens`` into ``seq`` in chunks of ``sizes``."""
        llama.llama_memory_seq_rm(self.mem, seq, -1, -1)
        p, last = 0, np.empty(0)
        for k in sizes:
            last = self.decode(tokens[p : p + k], list(range(p, p + k)), [seq] * k, [k - 1])[0]
            p += k
        return last


def measure_chunking(model: str = "default", threads: int = 2) -> list[dict[str, Any]]:
    """For flash attention auto (-1, llama.cpp's default) and off (0): each chunking's largest
    absolute logit difference to one 512 + 88 decode, and a decode step's alone vs beside 3
    other sequences.

    :raises RuntimeError: if the model cannot be loaded or a decode fails.
    """
    weights = load_weights(resolve_model(model), 0)
    if not weights:
        raise RuntimeError(f"llama.cpp could not load {model!r}")
    n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(weights))
    tokens = [(7 * i + 3) % 5000 + 100 for i in range(600)]
    rows: list[dict[str, Any]] = []
    try:
        for flash in (-1, 0):
            c = _Context(weights, flash, threads, n_vocab)
            try:
                ref = c.chunked(0, tokens, [512, 88])
                for sizes in CHUNKINGS:
                    diff = float(np.abs(c.chunked(1, tokens, sizes) - ref).max())
                    rows.append({"flash_attn": flash, "chunks": sizes, "max_abs_logit_diff": diff})
                for s in range(4):
                    c.chunked(s, tokens, [100])
                alone = c.decode([tokens[100]], [100], [0], [0])[0]
                for s in range(4):
                    llama.llama_memory_seq_rm(c.mem, s, 100, -1)
                beside = c.decode(tokens[100:104], [100] * 4, [0, 1, 2, 3], [0, 1, 2, 3])[0]
                rows.append({"flash_attn": flash, "chunks": "decode step alone vs beside 3",
                             "max_abs_logit_diff": float(np.abs(alone - beside).max())})  # fmt: skip
            finally:
                llama.llama_free(c.ctx)
    finally:
        llama.llama_model_free(weights)
    return rows


def main(argv: list[str] | None = None) -> None:
    """The command line: print the table and write it as JSON."""
    p = argparse.ArgumentParser(prog="python -m runtime.bench.chunking", description=__doc__)
    p.add_argument("--out", default="chunking.json")
    args = p.parse_args(argv)
    rows = measure_chunking()
    for r in rows:
        sys.stdout.write(
            f"flash_attn {r['flash_attn']:>2}  {r['chunks']!s:<36} {r['max_abs_logit_diff']:.3g}\n"
        )
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
