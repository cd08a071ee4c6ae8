"""A llama-shaped GGUF with random F16 weights: a model to measure speed with, where the
trained one is too big to carry (a 1.1B model is 2.2 GB; it is written in seconds).

::

    python -m runtime.bench.random_model /tmp/llama-1b-random.gguf --shape 1b

The vocabulary is a small SentencePiece one (byte pieces, printable characters and the words
of the benchmark's prompts with their prefixes), so that prompts tokenize to about as many tokens as with a
trained tokenizer; the rest of the vocabulary is filler pieces up to the shape's size.
The text it generates is noise; the compute per token is that of the shape.
"""

from __future__ import annotations

import argparse
import string
import time
from pathlib import Path

import numpy as np

from runtime.bench.workload import STORY_OPENINGS

__all__ = ["SHAPES", "write_random_llama"]

SHAPES: dict[str, dict[str, int]] = {
    # TinyLlama-1.1B's shape
    "1b": {"n_embd": 2048, "n_layer": 22, "n_head": 32, "n_head_kv": 4, "n_ff": 5632, "n_vocab": 32000},
    # SmolLM2-135M's shape (the embedded model), for a quick check on a CPU
    "135m": {"n_embd": 576, "n_layer": 30, "n_head": 9, "n_head_kv": 3, "n_ff": 1536, "n_vocab": 49152},
}
N_CTX_TRAIN = 8192
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6  # llama.cpp's token types


def _vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, types): <unk>, <s>, </s>, the 256 byte pieces, then text pieces."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    words = {w.strip(",.") for text in STORY_OPENINGS for w in text.split()} - {""}
    # SentencePiece merges two pieces only into a piece of the vocabulary: every prefix is one
    prefixes = sorted({f"\u2581{w}"[:k] for w in words for k in range(2, len(w) + 2)}, key=len)
    text_pieces = ["\u2581", *prefixes, *string.printable.strip()]
    text_pieces += [f"\u2581filler{i}" for i in range(n_vocab - len(pieces) - len(text_pieces))]
    pieces += text_pieces
    types += [_NORMAL] * len(text_pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(text_pieces))]
    return pieces[:n_vocab], scores[:n_vocab], types[:n_vocab]


def write_random_llama(path: Path, shape: str = "1b", seed: int = 0) -> int:
    """Write a random-weight llama model of ``shape`` (a key of SHAPES) to ``path``.

    :returns: the file's size in bytes.
    :raises KeyError: if ``shape`` is not known.
    """
    import gguf  # the ctransformers extra's GGUF writer

    s = SHAPES[shape]
    rng = np.random.default_rng(seed)
    head_dim = s["n_embd"] // s["n_head"]
    n_kv = head_dim * s["n_head_kv"]

    def weights(*numpy_shape: int) -> np.ndarray:
        return ((rng.random(numpy_shape, dtype=np.float32) - 0.5) * 0.04).astype(np.float16)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"random-llama-{shape}")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(s["n_embd"])
    writer.add_block_count(s["n_layer"])
    writer.add_feed_forward_length(s["n_ff"])
    writer.add_head_count(s["n_head"])
    writer.add_head_count_kv(s["n_head_kv"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    pieces, scores, types = _vocabulary(s["n_vocab"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    ones = np.ones(s["n_embd"], dtype=np.float32)
    writer.add_tensor("token_embd.weight", weights(s["n_vocab"], s["n_embd"]))
    for i in range(s["n_layer"]):
        b = f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", ones)
        writer.add_tensor(b + "attn_q.weight", weights(s["n_embd"], s["n_embd"]))
        writer.add_tensor(b + "attn_k.weight", weights(n_kv, s["n_embd"]))
        writer.add_tensor(b + "attn_v.weight", weights(n_kv, s["n_embd"]))
        writer.add_tensor(b + "attn_output.weight", weights(s["n_embd"], s["n_embd"]))
        writer.add_tensor(b + "ffn_norm.weight", ones)
        writer.add_tensor(b + "ffn_gate.weight", weights(s["n_ff"], s["n_embd"]))
        writer.add_tensor(b + "ffn_up.weight", weights(s["n_ff"], s["n_embd"]))
        writer.add_tensor(b + "ffn_down.weight", weights(s["n_embd"], s["n_ff"]))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weights(s["n_vocab"], s["n_embd"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.stat().st_size


def main() -> None:
    """``python -m runtime.bench.random_model PATH [--shape 1b|135m] [--seed N]``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    size = write_random_llama(args.path, args.shape, args.seed)
    print(f"wrote {args.path}: {size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
