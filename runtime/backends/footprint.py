"""What a model will take in memory before it is loaded: placement decides from this whether it
fits, and what to evict, without loading it first.

bytes = the file's size (the weights) + starting slots x per-slot KV bytes, the KV bytes from the
GGUF header: n_ctx_per_slot x n_layer x (key_length + value_length) x head_count_kv x bytes per
element (what runtime.backends.llama_cpp computes once loaded). Compute buffers are not known
before a context exists; the memory headroom covers them.
"""

from __future__ import annotations

from runtime.backends.gguf_metadata import read_gguf_metadata
from runtime.backends.model_files import resolve_model
from runtime.core.config import RuntimeConfig

__all__ = ["estimate_model_bytes"]

_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
_FAKE_BYTES = (100 << 20) + 4 * (1 << 20)
"""The fake backend's default weights and four slots of 1 MiB."""


def _int(value: object, fallback: int) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else fallback


def estimate_model_bytes(config: RuntimeConfig) -> int:
    """Bytes the model of ``config`` will hold with its starting slots (blocking: reads the file's
    header; call it from a worker thread).

    :raises ModelLoadError: if the file does not exist or is not a GGUF file.
    """
    if config.backend == "fake":
        return _FAKE_BYTES
    path = resolve_model(config.model)
    weights = path.stat().st_size
    meta = read_gguf_metadata(path, max_array_items=0)
    arch = str(meta.get("general.architecture") or "llama")
    n_embd = _int(meta.get(f"{arch}.embedding_length"), 0)
    n_head = max(1, _int(meta.get(f"{arch}.attention.head_count"), 1))
    n_head_kv = _int(meta.get(f"{arch}.attention.head_count_kv"), n_head)
    k_dim = _int(meta.get(f"{arch}.attention.key_length"), n_embd // n_head)
    v_dim = _int(meta.get(f"{arch}.attention.value_length"), n_embd // n_head)
    n_layer = _int(meta.get(f"{arch}.block_count"), 0)
    per_slot = config.n_ctx_per_slot * n_layer * (k_dim + v_dim) * n_head_kv
    return weights + int(config.initial_slots * per_slot * _BYTES_PER_ELEMENT[config.kv_cache_type])
