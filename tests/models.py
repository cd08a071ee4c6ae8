"""Tiny models written by the tests themselves (random weights, a few hundred KB each).

- ``write_tiny_llama``: a llama GGUF (F32, 2 layers, grouped-query attention) with a
  SentencePiece vocabulary: ``<unk>``, ``<s>``, ``</s>``, the 256 byte-fallback tokens
  ``<0x00>`` to ``<0xFF>``, two ChatML control tokens, and a few hundred word pieces; written
  with the ``gguf`` package, loadable by ctransformers 0.2.27 and by current llama.cpp alike.
- ``write_tiny_gpt2``: a legacy GGML gpt2 file (the unversioned ``ggml`` format of the ggml
  examples: header, vocabulary of raw bytes, F32 tensors) with the ``config.json`` beside it
  that names its model type, as ctransformers expects.

``LlamaCppReference`` reads a GGUF with current llama.cpp, for comparisons.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["GPT2_N_CTX", "TINY_CHAT_TEMPLATE", "LlamaCppReference", "write_tiny_gpt2", "write_tiny_llama"]

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GPT2_N_CTX = 64
_WORDS = [
    "the",
    "a",
    "an",
    "and",
    "of",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "he",
    "she",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "each",
    "which",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "over",
    "new",
    "sound",
    "take",
    "only",
    "little",
]


def _spm_pieces() -> list[str]:
    pieces = [f"▁{w}" for w in _WORDS]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
        f"▁{chr(c)}" for c in range(ord("a"), ord("z") + 1)
    ]
    pieces += ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "▁", ".", ",", "!", "?", "é", "ü"]
    return list(dict.fromkeys(pieces))


def write_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    """Write the tiny llama GGUF to ``path`` and return it (about 450 KB)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.CONTROL] * 2
    scores = [0.0] * len(tokens)
    for i, piece in enumerate(_spm_pieces()):
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i) - len(piece))  # SentencePiece merges the higher score first
    n_vocab, n_embd, n_head, n_head_kv, n_ff, n_layer = len(tokens), 64, 4, 2, 128, 2
    n_embd_kv = n_embd // n_head * n_head_kv

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)

    def weight(*shape: int, scale: float = 0.3) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_gpt2(folder: Path, *, seed: int = 0) -> Path:
    """Write ``tiny-gpt2.bin`` and ``config.json`` into ``folder``; return the model file
    (about 150 KB: vocabulary of the 256 bytes, some words and ``<|endoftext|>``)."""
    rng = np.random.default_rng(seed)
    vocab = [bytes([b]) for b in range(256)] + [f" {w}".encode() for w in _WORDS] + [b"<|endoftext|>"]
    n_vocab, n_ctx, n_embd, n_head, n_layer = len(vocab), GPT2_N_CTX, 32, 2, 2

    out = bytearray(struct.pack("<I", 0x67676D6C))
    out += struct.pack("<6i", n_vocab, n_ctx, n_embd, n_head, n_layer, 0)  # ftype 0: all F32
    out += struct.pack("<i", n_vocab)
    for word in vocab:
        out += struct.pack("<I", len(word)) + word

    def tensor(name: str, array: npt.NDArray[np.float32]) -> None:
        nonlocal out
        ne = list(reversed(array.shape))  # GGML lists the fastest-moving dimension first
        out += struct.pack("<3i", len(ne), len(name), 0) + struct.pack(f"<{len(ne)}i", *ne) + name.encode()
        out += np.ascontiguousarray(array, dtype="<f4").tobytes()

    def weight(*shape: int, scale: float = 0.3) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones, zeros = np.ones(n_embd, dtype=np.float32), np.zeros(n_embd, dtype=np.float32)
    tensor("model/ln_f/g", ones)
    tensor("model/ln_f/b", zeros)
    tensor("model/wte", weight(n_vocab, n_embd, scale=1.0))
    tensor("model/wpe", weight(n_ctx, n_embd, scale=0.1))
    for i in range(n_layer):
        h = f"model/h{i}"
        tensor(f"{h}/ln_1/g", ones)
        tensor(f"{h}/ln_1/b", zeros)
        tensor(f"{h}/ln_2/g", ones)
        tensor(f"{h}/ln_2/b", zeros)
        tensor(f"{h}/attn/c_attn/w", weight(3 * n_embd, n_embd))
        tensor(f"{h}/attn/c_attn/b", np.zeros(3 * n_embd, dtype=np.float32))
        tensor(f"{h}/attn/c_proj/w", weight(n_embd, n_embd))
        tensor(f"{h}/attn/c_proj/b", zeros)
        tensor(f"{h}/mlp/c_fc/w", weight(4 * n_embd, n_embd))
        tensor(f"{h}/mlp/c_fc/b", np.zeros(4 * n_embd, dtype=np.float32))
        tensor(f"{h}/mlp/c_proj/w", weight(n_embd, 4 * n_embd))
        tensor(f"{h}/mlp/c_proj/b", zeros)
    path = folder / "tiny-gpt2.bin"
    path.write_bytes(bytes(out))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return path


class LlamaCppReference:
    """Tokens, pieces and next-token logits of a GGUF file from current llama.cpp (logs off),
    for comparing another backend with. Close it when done.

    :raises RuntimeError: if llama.cpp cannot load the file.
    """

    def __init__(self, path: Path, n_ctx: int = 512) -> None:
        import llama_cpp as llama

        from runtime.backends.llama_cpp import init_llama

        # Initialise llama.cpp as the runtime does: its log callback (kept alive for the process)
        # routes to logging. A callback set here would be freed with this object while
        # llama.cpp still calls it: the next model load would crash.
        init_llama()
        self._llama = llama
        self._model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_threads, params.n_threads_batch = n_ctx, 1, 1
        self._ctx = llama.llama_init_from_model(self._model, params)
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self._vocab))

    def tokenize(self, text: str) -> list[int]:
        """Token ids with BOS if the model adds one; special tokens in the text parsed."""
        llama, data = self._llama, text.encode()
        buf = (llama.llama_token * (len(data) + 8))()
        n = llama.llama_tokenize(self._vocab, data, len(data), buf, len(buf), True, True)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of ``token`` as llama.cpp renders it (control tokens: empty)."""
        import ctypes

        buf = ctypes.create_string_buffer(256)
        n = self._llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def logits(self, tokens: list[int]) -> npt.NDArray[np.float32]:
        """Next-token logits after ``tokens`` (a fresh sequence), shape (n_vocab,)."""
        llama, n = self._llama, len(tokens)
        llama.llama_memory_clear(llama.llama_get_memory(self._ctx), True)
        ids = (llama.llama_token * n)(*tokens)  # the batch points into it: keep it alive
        if llama.llama_decode(self._ctx, llama.llama_batch_get_one(ids, n)) != 0:
            raise RuntimeError(f"llama_decode failed on {n} tokens")
        return np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        """Free the context and the model."""
        self._llama.llama_free(self._ctx)
        self._llama.llama_model_free(self._model)
