"""Backends: ``llama_cpp`` (default), ``ctransformers`` (legacy), ``fake`` (tests); see base.py."""

from __future__ import annotations

from runtime.backends.base import Backend, ModelInfo, SamplerSpec, StepPlan, StepResult
from runtime.config import RuntimeConfig
from runtime.errors import ConfigError, ModelLoadError
from runtime.models import resolve_model

__all__ = ["Backend", "ModelInfo", "SamplerSpec", "StepPlan", "StepResult", "load_backend"]


def load_backend(config: RuntimeConfig, n_seq: int | None = None) -> Backend:
    """Load the model of ``config`` with its backend (blocking: call it from a worker thread).

    :param n_seq: sequences of the first context (default: ``config.initial_slots``).

    :raises ModelLoadError: if the model file is missing or cannot be loaded.
    :raises ConfigError: if the backend is not available here.
    """
    if config.backend == "fake":
        from runtime.backends.fake import FakeBackend

        return FakeBackend(n_seq_max=n_seq or config.initial_slots, n_ctx_per_slot=config.n_ctx_per_slot)
    if config.backend == "llama_cpp":
        path = resolve_model(config.model)
        try:
            from runtime.backends.llama_cpp import LlamaCppBackend
        except ImportError as exc:
            raise ModelLoadError(
                f"the llama_cpp backend needs llama-cpp-python ({exc}); pip install 'slotserve[llama]'"
            ) from None
        return LlamaCppBackend(path, config, n_seq)
    if config.backend == "ctransformers":
        path = resolve_model(config.model)
        try:
            from runtime.backends.ctransformers import CTransformersBackend
        except ImportError as exc:
            raise ModelLoadError(
                f"the ctransformers backend needs ctransformers and gguf ({exc}); "
                "pip install 'slotserve[ctransformers]'"
            ) from None
        return CTransformersBackend(path, config, n_seq)
    raise ConfigError(f"backend {config.backend!r} is not available in this build")
