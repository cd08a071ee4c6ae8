"""Backends: ``llama_cpp`` (default), ``ctransformers`` (legacy), ``fake`` (tests); see base.py.

Only the kernel (runtime.core) is below this layer. A backend's library is imported when that
backend is loaded, never before.
"""

from __future__ import annotations

import importlib

from runtime.backends.base import Backend, ModelInfo, SamplerSpec, StepPlan, StepResult
from runtime.backends.model_files import resolve_model
from runtime.core.config import RuntimeConfig
from runtime.core.errors import ConfigError, ModelLoadError

__all__ = ["Backend", "ModelInfo", "SamplerSpec", "StepPlan", "StepResult", "load_backend"]

_FILE_BACKENDS = {
    # name: (module, class, what to install when its import fails)
    "llama_cpp": (
        "runtime.backends.llama_cpp",
        "LlamaCppBackend",
        "llama-cpp-python; pip install 'slotserve[llama]'",
    ),
    "ctransformers": (
        "runtime.backends.ctransformers.backend",
        "CTransformersBackend",
        "ctransformers and gguf; pip install 'slotserve[ctransformers]'",
    ),
}


def load_backend(config: RuntimeConfig, n_seq: int | None = None) -> Backend:
    """Load the model of ``config`` with its backend (blocking: call it from a worker thread).

    :param n_seq: sequences of the first context (default: ``config.initial_slots``).

    :raises ModelLoadError: if the model file is missing or cannot be loaded, or the backend's
        library is not installed (the message says what to install).
    :raises ConfigError: if the backend is not available in this build.
    """
    if config.backend == "fake":
        from runtime.backends.fake import FakeBackend

        return FakeBackend(n_seq_max=n_seq or config.initial_slots, n_ctx_per_slot=config.n_ctx_per_slot)
    if config.backend not in _FILE_BACKENDS:
        raise ConfigError(f"backend {config.backend!r} is not available in this build")
    module, name, needs = _FILE_BACKENDS[config.backend]
    path = resolve_model(config.model)
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ModelLoadError(f"the {config.backend} backend needs {needs} ({exc})") from None
    backend: Backend = cls(path, config, n_seq)
    return backend
