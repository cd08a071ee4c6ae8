"""What the listings say about the served model: the file's digest, its metadata, and Ollama's
``details`` made from it. Each is computed off the event loop and kept.

- ``digest``: the SHA-256 of the model file (hex), as Ollama lists a digest; read once per file
  version (path, size, mtime) and process, in a worker thread. A backend without a file (the
  fake) has the SHA-256 of its model's name (``ModelInfo.name``). The app starts it when it starts, so a big file is hashed
  before the first listing asks.
- ``metadata``: the backend's (GGUF) metadata, arrays of more than 5 items left empty as
  Ollama's /api/show shows them unless asked to be verbose; None until the model is loaded.
- ``details``: Ollama's ``details`` object: format, family and families (the architecture),
  parameter_size (``general.parameter_count`` written as Ollama writes it: 134.52M, 8.0B) and
  quantization_level (``general.file_type`` by llama.cpp's names: Q4_1, Q4_K_M, F16).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import anyio

from runtime.backends.base import MetadataValue
from runtime.backends.gguf_metadata import read_gguf_metadata
from runtime.backends.model_files import resolve_model
from runtime.core.errors import ModelLoadError, RuntimeClosedError
from runtime.server.served import ServedRuntime

__all__ = [
    "SHOWN_ARRAY_ITEMS",
    "ModelFacts",
    "details",
    "file_type_name",
    "parameter_size",
    "registry_listing",
]

SHOWN_ARRAY_ITEMS = 5
"""Arrays longer than this are shown empty unless verbose (Ollama's /api/show)."""

_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4", 39: "NVFP4",
    40: "Q1_0", 41: "Q2_0",
}  # fmt: skip
"""GGUF ``general.file_type`` (llama.cpp's ``llama_ftype``) -> its name."""

_HASH_CHUNK_BYTES = 8 << 20
_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


def parameter_size(n: int) -> str:
    """A parameter count as Ollama writes it: ``8.0B``, ``134.52M``, ``33K``, ``512``."""
    if n >= 1_000_000_000:
        value = n / 1e9
        return f"{value:.0f}B" if value.is_integer() else f"{value:.1f}B"
    if n >= 1_000_000:
        value = n / 1e6
        return f"{value:.0f}M" if value.is_integer() else f"{value:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.0f}K"
    return str(n)


def file_type_name(file_type: int) -> str:
    """llama.cpp's name of a GGUF ``general.file_type`` (``unknown`` for one it lacks)."""
    return _FILE_TYPES.get(file_type, "unknown")


def details(meta: Mapping[str, MetadataValue] | None, backend: str) -> dict[str, object]:
    """Ollama's ``details`` object for a model of ``meta`` (empty fields where it is None)."""
    meta = meta or {}
    arch = meta.get("general.architecture")
    count = meta.get("general.parameter_count")
    file_type = meta.get("general.file_type")
    return {
        "parent_model": "",
        "format": "gguf" if backend == "llama_cpp" else backend,
        "family": arch if isinstance(arch, str) else "",
        "families": [arch] if isinstance(arch, str) else [],
        "parameter_size": parameter_size(count) if isinstance(count, int) else "",
        "quantization_level": file_type_name(file_type) if isinstance(file_type, int) else "",
    }


def _sha256(path: Path) -> str:
    """The file's SHA-256 (hex), read in chunks; kept per file version."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _digests_lock:
        if key in _digests:
            return _digests[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    with _digests_lock:
        _digests[key] = digest.hexdigest()
    return _digests[key]


class ModelFacts:
    """The facts the listings show about ``runtime``'s model (see the module docstring)."""

    def __init__(self, runtime: ServedRuntime) -> None:
        self._runtime = runtime
        self._digest: str | None = None
        self._digest_lock = anyio.Lock()
        self._metadata: dict[str, MetadataValue] | None = None

    def file(self) -> Path | None:
        """The model file: the loaded backend's, else the configured one; None for the fake
        backend or a file that does not exist."""
        rt = self._runtime
        if rt.config.backend == "fake":
            return None
        with contextlib.suppress(RuntimeClosedError):
            return Path(rt.backend.info.path)
        try:
            return resolve_model(rt.config.model)
        except ModelLoadError:
            return None

    def _model_name(self) -> str:
        try:
            return self._runtime.backend.info.name
        except RuntimeClosedError:
            return self._runtime.config.backend

    def modified_at(self, fallback_s: float) -> str:
        """The model file's modification time (UTC, RFC 3339); ``fallback_s`` (Unix seconds)
        when there is no file."""
        when = fallback_s
        if (path := self.file()) is not None:
            with contextlib.suppress(OSError):
                when = os.stat(path).st_mtime
        return dt.datetime.fromtimestamp(when, dt.UTC).isoformat().replace("+00:00", "Z")

    def file_bytes(self) -> int | None:
        """The model file's size on disk, None when there is none."""
        if (path := self.file()) is None:
            return None
        try:
            return os.stat(path).st_size
        except OSError:
            return None

    async def digest(self) -> str:
        """The model file's SHA-256 (hex), computed once in a worker thread (callers meanwhile
        wait for the same computation); "" if the file cannot be read."""
        async with self._digest_lock:
            if self._digest is None:
                path = self.file()
                if path is None:
                    self._digest = hashlib.sha256(self._model_name().encode()).hexdigest()
                else:
                    try:
                        self._digest = await anyio.to_thread.run_sync(_sha256, path, abandon_on_cancel=True)
                    except OSError:
                        return ""
            return self._digest

    async def metadata(self, *, verbose: bool = False) -> dict[str, MetadataValue] | None:
        """The backend's metadata, read in a worker thread: kept once read, except a verbose
        one (every array whole), which is read for each call. None until the model is loaded.

        :raises ModelLoadError: if the backend cannot read it.
        """
        try:
            backend = self._runtime.backend
        except RuntimeClosedError:
            return None
        if verbose:
            return await anyio.to_thread.run_sync(lambda: backend.metadata(max_array_items=None))
        if self._metadata is None:
            self._metadata = await anyio.to_thread.run_sync(
                lambda: backend.metadata(max_array_items=SHOWN_ARRAY_ITEMS)
            )
        return self._metadata


def _file_facts(name: str, path: str) -> tuple[int, float | None, str, dict[str, MetadataValue] | None]:
    """(size on disk, mtime, SHA-256, metadata) of a registry model's file; for a file that is
    not there (a fake backend's name), (0, None, the SHA-256 of the name, None)."""
    file = Path(path)
    try:
        stat = file.stat()
        meta = read_gguf_metadata(file, max_array_items=SHOWN_ARRAY_ITEMS)
    except (OSError, ModelLoadError):
        return 0, None, hashlib.sha256(name.encode()).hexdigest(), None
    return stat.st_size, stat.st_mtime, _sha256(file), meta


async def registry_listing(name: str, path: str, backend: str, fallback_s: float) -> dict[str, object]:
    """A registry model as /api/tags and /api/ps list it (the file read in a worker thread; its
    digest kept per file version)."""
    size, mtime, digest, meta = await anyio.to_thread.run_sync(
        _file_facts, name, path, abandon_on_cancel=True
    )
    when = dt.datetime.fromtimestamp(fallback_s if mtime is None else mtime, dt.UTC)
    return {
        "name": name, "model": name, "modified_at": when.isoformat().replace("+00:00", "Z"), "size": size,
        "digest": digest, "details": details(meta, backend),
    }  # fmt: skip
