"""What the ctransformers backend reads from a model file itself, before the library loads it.

The library reports little (vocabulary size, context length, EOS and BOS ids) and hides its
loader's errors, so the file is read here with the ``gguf`` package (GGUF) or from the legacy
GGML header: the facts for memory accounting, the vocabulary's special and control tokens, the
chat template, and the known reasons the old loader would refuse (or crash on) the file.

Legacy GGML files carry no architecture; as ctransformers itself does, the model type is read
from a ``config.json`` beside the file (``{"model_type": "gpt2"}``).
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.backends.ctransformers.convert import open_gguf, unloadable_tensor
from runtime.core.errors import ModelLoadError

__all__ = ["LEGACY_MODEL_TYPES", "ModelFile", "read_model_file"]

GGUF_MAGIC = b"GGUF"
GGML_MAGIC = 0x67676D6C  # "ggml", the unversioned legacy format of the ggml examples

LEGACY_MODEL_TYPES = frozenset(
    {"gpt2", "gptj", "gpt_neox", "dolly-v2", "mpt", "replit", "starcoder", "gpt_bigcode", "falcon", "llama"}
)
"""Model types ctransformers 0.2.27 loads from legacy GGML files (its ``model_type`` names)."""

# Header layouts of the legacy families whose loaders were read for this table (ctransformers
# 0.2.27, models/llms/*.cc): the int32 header fields in file order, and the KV cache's element
# size in bytes. Families not listed still load; their KV size is reported as 0 (unknown).
_LEGACY_HEADERS: dict[str, tuple[tuple[str, ...], int]] = {
    "gpt2": (("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "ftype"), 4),
    "mpt": (("n_embd", "n_ctx", "n_head", "n_layer", "n_vocab"), 2),
    "replit": (("n_embd", "n_ctx", "n_head", "n_layer", "n_vocab", "ftype"), 2),
}

_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6
_EOG_TEXTS = frozenset({"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>"})
"""Control tokens that end a generation, as llama.cpp's vocabulary loader also treats them."""


@dataclass(frozen=True, slots=True)
class ModelFile:
    """Facts of one model file; sizes in bytes, lengths in tokens."""

    path: Path
    model_type: str
    """``gguf`` or a legacy family (LEGACY_MODEL_TYPES)."""
    name: str
    n_layer: int
    n_ctx_train: int
    weights_bytes: int
    weights_shared: bool
    """True where instances map the same pages (GGUF with mmap); False where each reads a copy."""
    kv_bytes_per_token: int
    """KV cache bytes per token of context in one instance (all layers, K and V); 0 if unknown."""
    kv_sized_by_file: bool = False
    """True where the cache is sized by the file's n_ctx whatever context is asked (replit)."""
    add_bos: bool = False
    bos_token: int = -1
    eos_token: int = -1
    chat_template: str | None = None
    special_tokens: dict[str, int] = field(default_factory=dict)
    """Text of a special token -> its id: where the text appears in a prompt, the id is used."""
    piece_overrides: dict[int, bytes] = field(default_factory=dict)
    """Token id -> its bytes, where the library's C-string detokenizer is wrong: control and
    unknown tokens show no text (as in llama.cpp), byte-fallback tokens (``<0x41>``) are their
    byte, and tokens holding a NUL byte are whole."""
    end_tokens: frozenset[int] = frozenset()
    """End-of-generation ids beyond the library's own EOS (EOT, ``<|im_end|>`` and the like)."""


def read_model_file(path: Path) -> ModelFile:
    """Read the facts of ``path`` (GGUF or legacy GGML); remembered per file version, since a
    large vocabulary takes the gguf reader seconds.

    :raises ModelLoadError: if the file is neither, a legacy file has no model type beside it,
        or a GGUF file has what ctransformers 0.2.27 cannot load (named, with the way out).
    """
    stat = path.stat()
    return _read_model_file(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_model_file(path: Path, _mtime_ns: int, _size: int) -> ModelFile:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return _read_gguf(path)
    if len(magic) == 4 and struct.unpack("<I", magic)[0] == GGML_MAGIC:
        return _read_legacy(path)
    raise ModelLoadError(f"{str(path)!r} is neither a GGUF nor a legacy GGML model file (magic {magic!r})")


def _read_gguf(path: Path) -> ModelFile:
    reader = open_gguf(path)
    fields = reader.fields

    def value(key: str, default: Any = None) -> Any:
        f = fields.get(key)
        return default if f is None else f.contents()

    arch = str(value("general.architecture", ""))
    convert = f"; write a loadable copy with `slotserve convert --for ctransformers {path} OUT.gguf`"
    if arch not in ("llama", "falcon"):
        raise ModelLoadError(f"{str(path)!r} is a {arch!r} GGUF; ctransformers 0.2.27 loads llama and falcon")
    if (bad := unloadable_tensor(reader)) is not None:
        raise ModelLoadError(f"tensor {bad[0]!r} is {bad[1]}, which ctransformers 0.2.27 cannot load")
    tokens_field = fields.get("tokenizer.ggml.tokens")
    if tokens_field is None:
        raise ModelLoadError(f"{str(path)!r} has no vocabulary (tokenizer.ggml.tokens)")
    tokens = [bytes(tokens_field.parts[i]) for i in tokens_field.data]
    types = [int(t) for t in value("tokenizer.ggml.token_type", [1] * len(tokens))]
    tokenizer = str(value("tokenizer.ggml.model", "llama"))
    names = {t.name for t in reader.tensors}
    if arch == "llama" and "output.weight" not in names:
        raise ModelLoadError(
            f"{str(path)!r} ties its output to token_embd.weight; the old loader needs output.weight{convert}"
        )
    if "tokenizer.ggml.scores" not in fields:
        raise ModelLoadError(
            f"{str(path)!r} has no tokenizer.ggml.scores, which the old loader requires{convert}"
        )
    if tokenizer == "gpt2" and b"\n" not in tokens:
        raise ModelLoadError(
            f"{str(path)!r} stores its GPT-2 vocabulary in byte-level form, on which the old loader crashes{convert}"
        )
    n_embd = int(value(f"{arch}.embedding_length", 0))
    n_head = int(value(f"{arch}.attention.head_count", 1))
    n_head_kv = int(value(f"{arch}.attention.head_count_kv", n_head))
    n_layer = int(value(f"{arch}.block_count", 0))
    texts = [t.decode(errors="replace") for t in tokens]
    special = {texts[i]: i for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED) and tokens[i]}
    control = frozenset(i for i, kind in enumerate(types) if kind == _CONTROL)
    overrides: dict[int, bytes] = {}
    for i, kind in enumerate(types):
        if kind in (_CONTROL, _UNKNOWN):
            overrides[i] = b""
        elif kind == _BYTE and len(texts[i]) == 6 and texts[i].startswith("<0x"):
            overrides[i] = bytes([int(texts[i][3:5], 16)])
        elif b"\0" in tokens[i]:
            overrides[i] = tokens[i].replace("▁".encode(), b" ") if tokenizer == "llama" else tokens[i]
    ends = {i for i in control if texts[i] in _EOG_TEXTS}
    eot = value("tokenizer.ggml.eot_token_id")
    if eot is not None:
        ends.add(int(eot))
    template = value("tokenizer.chat_template")
    return ModelFile(
        path=path,
        model_type="gguf",
        name=str(value("general.name", path.stem)),
        n_layer=n_layer,
        n_ctx_train=int(value(f"{arch}.context_length", 0)),
        weights_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        weights_shared=True,
        kv_bytes_per_token=2 * n_layer * (n_embd // max(n_head, 1)) * n_head_kv * 2,  # K and V, f16
        add_bos=bool(value("tokenizer.ggml.add_bos_token", tokenizer == "llama")),
        bos_token=int(value("tokenizer.ggml.bos_token_id", -1)),
        eos_token=int(value("tokenizer.ggml.eos_token_id", -1)),
        chat_template=None if template is None else str(template),
        special_tokens=special,
        piece_overrides=overrides,
        end_tokens=frozenset(ends),
    )


def legacy_model_type(path: Path) -> str:
    """The model type of a legacy file, from ``config.json`` beside it (ctransformers' convention).

    :raises ModelLoadError: if there is none, or it names a type ctransformers cannot load.
    """
    config = path.parent / "config.json"
    try:
        model_type = str(json.loads(config.read_text())["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelLoadError(
            f"{str(path)!r} is a legacy GGML file, which names no architecture; put a config.json "
            f'beside it with {{"model_type": ...}}, one of {", ".join(sorted(LEGACY_MODEL_TYPES))}'
        ) from None
    if model_type not in LEGACY_MODEL_TYPES:
        raise ModelLoadError(
            f"{str(config)!r} names model_type {model_type!r}; ctransformers 0.2.27 loads "
            f"{', '.join(sorted(LEGACY_MODEL_TYPES))} from legacy files"
        )
    return model_type


def _read_legacy(path: Path) -> ModelFile:
    model_type = legacy_model_type(path)
    layout, kv_element_bytes = _LEGACY_HEADERS.get(model_type, ((), 0))
    with path.open("rb") as f:
        f.read(4)
        values = struct.unpack(f"<{len(layout)}i", f.read(4 * len(layout))) if layout else ()
    header = dict(zip(layout, values, strict=True))
    n_layer = header.get("n_layer", 0)
    overrides = {i: word for i, word in enumerate(_gpt2_vocabulary(path)) if b"\0" in word}
    return ModelFile(
        path=path,
        model_type=model_type,
        name=path.stem,
        n_layer=n_layer,
        n_ctx_train=header.get("n_ctx", 0),
        weights_bytes=path.stat().st_size,
        weights_shared=False,
        kv_bytes_per_token=2 * n_layer * header.get("n_embd", 0) * kv_element_bytes,
        kv_sized_by_file=model_type == "replit",
        piece_overrides=overrides,
    )


def _gpt2_vocabulary(path: Path) -> list[bytes]:
    """The raw vocabulary of a legacy gpt2 file (empty for other families: their layouts differ)."""
    if legacy_model_type(path) != "gpt2":
        return []
    words: list[bytes] = []
    with path.open("rb") as f:
        f.seek(4 + 4 * 6)  # magic, 6 int32 hparams
        (n_vocab,) = struct.unpack("<i", f.read(4))
        for _ in range(n_vocab):
            (length,) = struct.unpack("<I", f.read(4))
            words.append(f.read(length))
    return words
