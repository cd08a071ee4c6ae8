"""Rewrite a modern llama GGUF so that ctransformers 0.2.27's loader accepts it.

ctransformers 0.2.27 bundles the llama.cpp of September 2023. Its GGUF loader refuses (with
nothing more than "Failed to create LLM") a file that a current llama.cpp writes for a small
model such as the embedded SmolLM2, for three reasons that this module removes:

- it requires ``tokenizer.ggml.scores``: a GPT-2 (BPE) vocabulary has none, so zeros are added;
- it requires a separate ``output.weight``: SmolLM2 ties the output to ``token_embd.weight``,
  so the embedding tensor is written a second time under that name (same type, same bytes);
- its BPE tokenizer looks tokens up by their raw UTF-8 text, while a GPT-2 vocabulary stores
  every byte as a printable stand-in character (``Ġ`` for a space: GPT-2's ``bytes_to_unicode``
  table); with the stand-ins it cannot even find the newline token and crashes while loading.
  So tokens are written as the raw bytes they stand for, and merges in the form its merge
  lookup uses: raw bytes, except that space and newline stay ``Ġ`` and ``Ċ`` (it translates
  only those two before looking a pair up).

What cannot be carried over is refused with an error naming it: architectures other than
llama, and tensor types that loader does not know (it has F32, F16, Q4_0/1, Q5_0/1, Q8_0 and
Q2_K to Q6_K). Nothing is downloaded; the gguf package (llama.cpp's own) reads and writes.

A difference that remains comes from the old tokenizer itself: its pre-tokenizer splits words
with ASCII character classes, so non-ASCII words may be cut into other (valid) tokens than a
current llama.cpp chooses. ASCII text tokenizes the same, and any text round-trips exactly.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from runtime.core.errors import ModelLoadError

__all__ = [
    "CTRANSFORMERS_TENSOR_TYPES",
    "convert_for_ctransformers",
    "gpt2_byte_decoder",
    "open_gguf",
    "unloadable_tensor",
]

CTRANSFORMERS_TENSOR_TYPES = frozenset(
    {"F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)
"""GGML tensor types the llama.cpp inside ctransformers 0.2.27 can load."""


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path``.

    :raises ModelLoadError: if the file cannot be read as GGUF (the reason is named).
    """
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{str(path)!r} is not a readable GGUF file: {exc}") from None


def unloadable_tensor(reader: Any) -> tuple[str, str] | None:
    """The first tensor (name, type) of ``reader`` whose type ctransformers 0.2.27 cannot load."""
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in CTRANSFORMERS_TENSOR_TYPES:
            return tensor.name, tensor.tensor_type.name
    return None


_TOKEN_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
_NORMAL, _CONTROL = 1, 3


@functools.cache
def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` table reversed: stand-in character -> the byte it encodes.

    The 188 printable Latin-1 bytes stand for themselves; the other 68 are shifted to U+0100 on
    (openai/gpt-2 ``encoder.py``; the same table is in every byte-level BPE tokenizer).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shifted)
            shifted += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


def _raw_bytes(text: str) -> bytes:
    """The bytes a byte-level BPE token stands for; text outside the table stays UTF-8."""
    table = gpt2_byte_decoder()
    if all(c in table for c in text):
        return bytes(table[c] for c in text)
    return text.encode()


def _merge_side(text: str) -> bytes:
    """One side of a merge rule as the old ``find_bpe_rank`` looks it up (see module docstring)."""
    return _raw_bytes(text).replace(b" ", "Ġ".encode()).replace(b"\n", "Ċ".encode())


def convert_for_ctransformers(source: str | Path, target: str | Path) -> Path:
    """Write ``source`` (a llama GGUF) to ``target`` in the form ctransformers 0.2.27 loads.

    See the module docstring for what changes. Takes about as long as copying the file.

    :returns: ``target`` as a Path.
    :raises ModelLoadError: if ``source`` is missing or not a GGUF file, its architecture is
        not llama, or a tensor has a type that loader does not know (the tensor is named).
    """
    import gguf

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise ModelLoadError(f"model file {str(source)!r} does not exist")
    if source.resolve() == target.resolve():
        raise ModelLoadError(f"the converted model must go to another file than {str(source)!r}")
    reader = open_gguf(source)
    arch = str(reader.fields["general.architecture"].contents())
    if arch != "llama":
        raise ModelLoadError(
            f"{str(source)!r} has architecture {arch!r}; this converter writes llama models only"
        )
    if (bad := unloadable_tensor(reader)) is not None:
        raise ModelLoadError(
            f"tensor {bad[0]!r} is {bad[1]}; ctransformers 0.2.27 loads "
            f"only {', '.join(sorted(CTRANSFORMERS_TENSOR_TYPES))}"
        )
    writer = gguf.GGUFWriter(target, arch)
    _copy_metadata(reader, writer)
    _write_vocabulary(reader, writer)
    names = {t.name for t in reader.tensors}
    for tensor in reader.tensors:
        _add_tensor(writer, tensor.name, tensor)
    if "output.weight" not in names:
        _add_tensor(writer, "output.weight", next(t for t in reader.tensors if t.name == "token_embd.weight"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _copy_metadata(reader: object, writer: object) -> None:
    """Every key but the file header's, the architecture (the writer adds it) and the vocabulary."""
    import gguf

    assert isinstance(reader, gguf.GGUFReader) and isinstance(writer, gguf.GGUFWriter)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in _TOKEN_KEYS:
            continue
        if name == "tokenizer.ggml.token_type":
            continue  # written with the tokens
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub_type)


def _write_vocabulary(reader: object, writer: object) -> None:
    """Tokens and merges as raw bytes (control tokens as they are), and zero scores."""
    import gguf

    assert isinstance(reader, gguf.GGUFReader) and isinstance(writer, gguf.GGUFWriter)
    tokens: list[str] = reader.fields["tokenizer.ggml.tokens"].contents()
    types: list[int] = reader.fields["tokenizer.ggml.token_type"].contents()
    model = str(reader.fields["tokenizer.ggml.model"].contents())
    scores_field = reader.fields.get("tokenizer.ggml.scores")
    if model == "gpt2":
        raw = [
            _raw_bytes(t) if kind == _NORMAL else t.encode() for t, kind in zip(tokens, types, strict=True)
        ]
        writer.add_token_list(raw)
        merges: list[str] = reader.fields["tokenizer.ggml.merges"].contents()
        writer.add_token_merges([b" ".join(_merge_side(side) for side in m.split(" ", 1)) for m in merges])
    else:
        writer.add_token_list(tokens)
        if "tokenizer.ggml.merges" in reader.fields:
            writer.add_token_merges(reader.fields["tokenizer.ggml.merges"].contents())
    writer.add_token_types(types)
    if scores_field is not None:
        writer.add_token_scores(scores_field.contents())
    else:
        writer.add_token_scores(np.zeros(len(tokens), dtype=np.float32).tolist())


def _add_tensor(writer: object, name: str, tensor: object) -> None:
    """Copy a tensor's bytes as they are, quantized or not."""
    import gguf

    assert isinstance(writer, gguf.GGUFWriter) and isinstance(tensor, gguf.ReaderTensor)
    # The reader's array has numpy shape (bytes per row for quantized types), as the writer wants.
    writer.add_tensor(name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
