"""slotserve: one language model, loaded once, serving many concurrent requests through slots.

The public API; everything else is internal. See README.md for a tour.
"""

from __future__ import annotations

from runtime.config import RuntimeConfig
from runtime.errors import (
    ConfigError,
    ContextOverflowError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
    RuntimeClosedError,
    RuntimeFailedError,
    SlotFailedError,
    SlotserveError,
)
from runtime.messages import (
    ChatMessage,
    ChatRequest,
    Chunk,
    Completion,
    DoneReason,
    GenerateRequest,
    RequestStats,
    RuntimeStatus,
    decode_request,
)
from runtime.metrics import metrics_app
from runtime.runtime import Runtime
from runtime.ticket import ResponseStream

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "Chunk",
    "Completion",
    "ConfigError",
    "ContextOverflowError",
    "DoneReason",
    "GenerateRequest",
    "GenerationError",
    "InvalidRequestError",
    "ModelLoadError",
    "QueueFullError",
    "RequestStats",
    "ResponseStream",
    "Runtime",
    "RuntimeClosedError",
    "RuntimeConfig",
    "RuntimeFailedError",
    "RuntimeStatus",
    "SlotFailedError",
    "SlotserveError",
    "decode_request",
    "metrics_app",
]
