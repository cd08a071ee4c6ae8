"""slotserve: one language model, loaded once, serving many concurrent requests through slots.

The public API; everything else is internal. See README.md for a tour. Names are handed on
lazily (as anyio does): importing one kernel module, such as ``runtime.core.errors``, does not
load the actors, the backends or prometheus-client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.core.lazy import lazy_exports

if TYPE_CHECKING:
    from runtime.core.choices import ChoiceStream
    from runtime.core.config import RuntimeConfig
    from runtime.core.errors import (
        ConfigError,
        ContextOverflowError,
        DeadlineUnmetError,
        EmbeddingsUnsupportedError,
        GenerationError,
        InvalidRequestError,
        ModelLoadError,
        ModelMemoryError,
        ModelNotFoundError,
        QueueFullError,
        ReplicaLostError,
        ResizeFailedError,
        RuntimeClosedError,
        RuntimeFailedError,
        SlotFailedError,
        SlotserveError,
        TenantQueueFullError,
    )
    from runtime.core.messages import (
        ChatMessage,
        ChatRequest,
        Chunk,
        Completion,
        DoneReason,
        Embeddings,
        EmbedRequest,
        GenerateRequest,
        QueueEstimate,
        RequestStats,
        TokenLogprob,
        TopLogprob,
        decode_request,
    )
    from runtime.core.records import QueuedRequest, ResizeRecord, RuntimeStatus
    from runtime.core.registry import ModelRegistry, ModelSpec
    from runtime.core.residency import LoadedModel
    from runtime.core.ticket import ResponseStream
    from runtime.core.tools import FunctionCall, NamedTool, Tool, ToolCall
    from runtime.metrics import metrics_app
    from runtime.runtime import Runtime

_ERRORS = "runtime.core.errors"
_MESSAGES = "runtime.core.messages"
_TOOLS = "runtime.core.tools"
_HOMES = {
    "ChatMessage": _MESSAGES,
    "ChatRequest": _MESSAGES,
    "ChoiceStream": "runtime.core.choices",
    "Chunk": _MESSAGES,
    "Completion": _MESSAGES,
    "ConfigError": _ERRORS,
    "ContextOverflowError": _ERRORS,
    "DeadlineUnmetError": _ERRORS,
    "DoneReason": _MESSAGES,
    "EmbedRequest": _MESSAGES,
    "Embeddings": _MESSAGES,
    "EmbeddingsUnsupportedError": _ERRORS,
    "FunctionCall": _TOOLS,
    "GenerateRequest": _MESSAGES,
    "GenerationError": _ERRORS,
    "InvalidRequestError": _ERRORS,
    "LoadedModel": "runtime.core.residency",
    "ModelLoadError": _ERRORS,
    "ModelMemoryError": _ERRORS,
    "ModelNotFoundError": _ERRORS,
    "ModelRegistry": "runtime.core.registry",
    "ModelSpec": "runtime.core.registry",
    "NamedTool": _TOOLS,
    "QueueEstimate": _MESSAGES,
    "QueueFullError": _ERRORS,
    "ReplicaLostError": _ERRORS,
    "QueuedRequest": "runtime.core.records",
    "RequestStats": _MESSAGES,
    "ResizeFailedError": _ERRORS,
    "ResizeRecord": "runtime.core.records",
    "ResponseStream": "runtime.core.ticket",
    "Runtime": "runtime.runtime",
    "RuntimeClosedError": _ERRORS,
    "RuntimeConfig": "runtime.core.config",
    "RuntimeFailedError": _ERRORS,
    "RuntimeStatus": "runtime.core.records",
    "SlotFailedError": _ERRORS,
    "SlotserveError": _ERRORS,
    "TenantQueueFullError": _ERRORS,
    "TokenLogprob": _MESSAGES,
    "Tool": _TOOLS,
    "ToolCall": _TOOLS,
    "TopLogprob": _MESSAGES,
    "decode_request": _MESSAGES,
    "metrics_app": "runtime.metrics",
}
"""Each public name (``__all__``) -> the module that defines it."""

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "ChoiceStream",
    "Chunk",
    "Completion",
    "ConfigError",
    "ContextOverflowError",
    "DeadlineUnmetError",
    "DoneReason",
    "EmbedRequest",
    "Embeddings",
    "EmbeddingsUnsupportedError",
    "FunctionCall",
    "GenerateRequest",
    "GenerationError",
    "InvalidRequestError",
    "LoadedModel",
    "ModelLoadError",
    "ModelMemoryError",
    "ModelNotFoundError",
    "ModelRegistry",
    "ModelSpec",
    "NamedTool",
    "QueueEstimate",
    "QueueFullError",
    "QueuedRequest",
    "ReplicaLostError",
    "RequestStats",
    "ResizeFailedError",
    "ResizeRecord",
    "ResponseStream",
    "Runtime",
    "RuntimeClosedError",
    "RuntimeConfig",
    "RuntimeFailedError",
    "RuntimeStatus",
    "SlotFailedError",
    "SlotserveError",
    "TenantQueueFullError",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "TopLogprob",
    "decode_request",
    "metrics_app",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
