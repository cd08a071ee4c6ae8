"""A GGUF file's metadata (its key-value header), typed, without loading the model.

llama.cpp hands metadata out as strings and leaves arrays out, so the header is read here with
``struct`` from a memory map: GGUF v2 and v3, little-endian (the layout of ggml's
``docs/gguf.md``). Only the header is read, never the tensors; a long string array (a
vocabulary of 49,152 tokens) is skipped in about 20 ms.

Values keep their types: integers, floats (float32 values as their shortest decimal, as
Ollama shows them), bools, strings, and lists of these.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from runtime.core.errors import ModelLoadError

__all__ = ["GGUF_MAGIC", "MetadataValue", "read_gguf_metadata"]

GGUF_MAGIC = b"GGUF"

MetadataValue = str | int | float | bool | list["MetadataValue"]
"""One metadata value: a scalar or a list of them (GGUF arrays may nest)."""

_SCALARS = {  # GGUF value type -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


class _Reader:
    """Reads values from ``buf`` at ``at``, checking every length against the buffer's end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.at = 0
        self.path = path

    def _take(self, n: int) -> int:
        start = self.at
        if n < 0 or start + n > len(self.buf):
            raise ModelLoadError(f"{str(self.path)!r}: GGUF header runs past the end of the file")
        self.at += n
        return start

    def scalar(self, fmt: str) -> int | float | bool:
        start = self._take(struct.calcsize(fmt))
        value: int | float | bool = struct.unpack_from("<" + fmt, self.buf, start)[0]
        return value

    def string(self) -> str:
        n = int(self.scalar("Q"))
        start = self._take(n)
        return bytes(self.buf[start : start + n]).decode(errors="replace")

    def skip_string(self) -> None:
        self._take(int(self.scalar("Q")))

    def value(self, kind: int, max_items: int | None) -> MetadataValue:
        if kind == _STRING:
            return self.string()
        if kind == _FLOAT32:
            return float(str(np.float32(self.scalar("f"))))  # shortest decimal: 1e-05, not 9.99e-06
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind != _ARRAY:
            raise ModelLoadError(f"{str(self.path)!r}: unknown GGUF value type {kind}")
        item_kind, count = int(self.scalar("I")), int(self.scalar("Q"))
        if max_items is not None and count > max_items:
            self._skip_array(item_kind, count)
            return []
        return [self.value(item_kind, max_items) for _ in range(count)]

    def _skip_array(self, kind: int, count: int) -> None:
        if kind in _SCALARS:
            self._take(count * struct.calcsize(_SCALARS[kind]))
        elif kind == _STRING:
            for _ in range(count):
                self.skip_string()
        else:
            for _ in range(count):
                self.value(kind, 0)


def read_gguf_metadata(path: str | Path, *, max_array_items: int | None = None) -> dict[str, MetadataValue]:
    """The metadata of the GGUF file at ``path``, key -> typed value, in file order.

    :param max_array_items: an array of more items than this is given as an empty list (Ollama's
        /api/show does the same unless asked to be verbose); None gives every array whole.
    :raises ModelLoadError: if the file cannot be read, is not GGUF v2 or v3, or its header is
        cut short.
    """
    path = Path(path)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read(_Reader(buf, path), max_array_items)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise ModelLoadError(f"could not read the GGUF metadata of {str(path)!r}: {exc}") from None


def _read(r: _Reader, max_array_items: int | None) -> dict[str, MetadataValue]:
    start = r._take(4)
    magic = bytes(r.buf[start : start + 4])
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{str(r.path)!r} is not a GGUF file (magic {magic!r})")
    version = int(r.scalar("I"))
    if version not in (2, 3):
        raise ModelLoadError(f"{str(r.path)!r} is GGUF version {version}; versions 2 and 3 are read")
    r.scalar("Q")  # tensor count
    n_kv = int(r.scalar("Q"))
    out: dict[str, MetadataValue] = {}
    for _ in range(n_kv):
        key = r.string()
        out[key] = r.value(int(r.scalar("I")), max_array_items)
    return out
