"""The one exception hierarchy of slotserve.

::

    SlotserveError
    ├── ConfigError               a RuntimeConfig value is out of range or unknown
    ├── InvalidRequestError       a request field is missing, of the wrong type or out of range
    │   ├── ContextOverflowError  prompt + max_tokens do not fit the slot's context
    │   └── EmbeddingsUnsupportedError  the model or backend cannot embed text
    ├── QueueFullError            the mailbox is full (admission refused)
    │   ├── TenantQueueFullError  one tenant has its most requests waiting (tenant_max_queued)
    │   └── DeadlineUnmetError    the predicted first token is later than the request's deadline
    ├── ModelNotFoundError        a request names a model the registry does not hold
    ├── ModelMemoryError          a model does not fit in memory, whatever is evicted
    ├── ModelLoadError            the weights could not be found or loaded
    │   └── ResizeFailedError     a new context could not be built; the old count serves on
    ├── RuntimeClosedError        the runtime is not running (not started, closing or closed)
    │   └── RuntimeFailedError    too many restarts within the restart period
    └── GenerationError           a request failed after admission
        ├── SlotFailedError       the slot serving the request crashed (it was restarted)
        └── ReplicaLostError      the replica serving it died after its first chunk (Ray Serve)

Every message says what was wrong, the value, and the limit.
"""

from __future__ import annotations

from typing import ClassVar, Literal

AdmissionRefusal = Literal["queue_full", "tenant_cap", "deadline"]

__all__ = [
    "ConfigError",
    "ContextOverflowError",
    "DeadlineUnmetError",
    "EmbeddingsUnsupportedError",
    "GenerationError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelMemoryError",
    "ModelNotFoundError",
    "QueueFullError",
    "ReplicaLostError",
    "ResizeFailedError",
    "RuntimeClosedError",
    "RuntimeFailedError",
    "SlotFailedError",
    "SlotserveError",
    "TenantQueueFullError",
]


class SlotserveError(Exception):
    """Base class of every error slotserve raises on purpose."""


class ConfigError(SlotserveError, ValueError):
    """A RuntimeConfig value is out of range, of the wrong type, or unknown."""


class InvalidRequestError(SlotserveError, ValueError):
    """A request is malformed; the message names the field, its value and the limit.

    Subclasses ValueError so that msgspec reports it as a validation error while decoding.
    """


class ContextOverflowError(InvalidRequestError):
    """The prompt plus max_tokens does not fit the slot's context (no silent truncation).

    :ivar prompt_tokens: tokens in the prompt (with ``at_least``: a lower bound, the prompt was
        refused before it was tokenized whole).
    :ivar max_tokens: tokens the request asked to generate.
    :ivar n_ctx_per_slot: the slot's context size in tokens.

    ``subject`` names what is too long where it is not a prompt (``input[3]``, an input to
    embed: the message then has no max_tokens).
    """

    def __init__(
        self,
        prompt_tokens: int,
        max_tokens: int,
        n_ctx_per_slot: int,
        *,
        at_least: str = "",
        subject: str = "prompt",
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx_per_slot = n_ctx_per_slot
        if at_least:
            plural = "" if prompt_tokens == 1 else "s"
            also = f" and max_tokens is {max_tokens:,}" if max_tokens else ""
            super().__init__(
                f"{subject} is at least {prompt_tokens:,} token{plural} ({at_least}){also}; "
                f"slot context is {n_ctx_per_slot:,} tokens (n_ctx_per_slot)"
            )
            return
        if subject != "prompt":  # an input to embed: nothing is generated
            super().__init__(
                f"{subject} is {prompt_tokens:,} tokens; slot context is {n_ctx_per_slot:,} tokens "
                "(n_ctx_per_slot)"
            )
            return
        super().__init__(
            f"prompt is {prompt_tokens:,} tokens and max_tokens is {max_tokens:,} "
            f"({prompt_tokens + max_tokens:,} in all); "
            f"slot context is {n_ctx_per_slot:,} tokens (n_ctx_per_slot)"
        )


class EmbeddingsUnsupportedError(InvalidRequestError):
    """The model or its backend cannot embed text (``ModelInfo.embedding_length`` is 0): a
    backend without an embedding path (ctransformers), or a model whose pooling gives no vector
    (a reranker)."""


class QueueFullError(SlotserveError):
    """The mailbox holds ``capacity`` requests already and every slot is busy.

    :ivar reason: why admission refused (``queue_full``, ``tenant_cap``, ``deadline``).
    :ivar retry_after_s: seconds after which a retry is predicted to be admitted, where the
        runtime could tell (None: it could not; HTTP then says its configured Retry-After).
    """

    reason: ClassVar[AdmissionRefusal] = "queue_full"

    def __init__(self, capacity: int, waited_s: float | None = None, *, message: str = "") -> None:
        self.capacity = capacity
        self.waited_s = waited_s
        self.retry_after_s: float | None = None
        waited = "" if waited_s is None else f" after waiting {waited_s:g} s"
        super().__init__(message or f"mailbox is full ({capacity} queued, max_queue={capacity}){waited}")


class TenantQueueFullError(QueueFullError):
    """One tenant has ``tenant_max_queued`` requests waiting already (others are still
    admitted); HTTP answers 429 with Retry-After."""

    reason: ClassVar[AdmissionRefusal] = "tenant_cap"

    def __init__(self, tenant: str, cap: int) -> None:
        self.tenant = tenant
        super().__init__(
            cap,
            message=f"tenant {tenant!r} has {cap} requests waiting; the limit is {cap} (tenant_max_queued)",
        )


class DeadlineUnmetError(QueueFullError):
    """The request's first token is predicted later than its ``deadline_ms``: refused at once,
    with ``retry_after_s`` from the prediction (HTTP: 503 with Retry-After)."""

    reason: ClassVar[AdmissionRefusal] = "deadline"

    def __init__(self, deadline_ms: float, predicted_ms: float, retry_after_s: float) -> None:
        self.deadline_ms = deadline_ms
        self.predicted_ms = predicted_ms
        super().__init__(
            0,
            message=f"the first token is predicted in {predicted_ms:,.0f} ms; the request's deadline_ms is "
            f"{deadline_ms:,.0f}; retry in {retry_after_s:.3g} s",
        )
        self.retry_after_s = retry_after_s


class ModelNotFoundError(SlotserveError):
    """A request names a model that is not in the registry (no request can name a path).

    :ivar name: the name asked for.
    """

    def __init__(self, name: str, served: list[str]) -> None:
        self.name = name
        listed = ", ".join(served[:8]) + (", ..." if len(served) > 8 else "")
        super().__init__(f"model {preview(name)} not found; this server serves: {listed}")


class ModelMemoryError(SlotserveError):
    """A model cannot be loaded: even with every idle, unpinned model evicted and idle slots
    shrunk, memory has no room for it (refused at once, never waited on).

    :ivar needed_bytes: bytes the model needs (weights and its starting slots' KV cache).
    :ivar free_bytes: bytes free for models now (after the headroom).
    :ivar reclaimable_bytes: bytes that evicting and shrinking could free at most.
    """

    def __init__(self, model: str, needed_bytes: int, free_bytes: int, reclaimable_bytes: int) -> None:
        self.model = model
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes = max(0, free_bytes)
        self.reclaimable_bytes = reclaimable_bytes
        super().__init__(
            f"model {model!r} needs {needed_bytes:,} bytes; {free_bytes:,} bytes are free and evicting "
            f"idle models could free {reclaimable_bytes:,} more"
        )


class ModelLoadError(SlotserveError):
    """The model file is missing or the backend could not load it."""


class ResizeFailedError(ModelLoadError):
    """A context of the new slot count could not be built (out of memory, most often on a GPU);
    the backend serves on at the old count, its sequences carried back."""


class RuntimeClosedError(SlotserveError):
    """The runtime does not accept requests: it is not started, is closing or is closed."""


class RuntimeFailedError(RuntimeClosedError):
    """The runtime stopped serving after more restarts than its restart intensity allows."""


class GenerationError(SlotserveError):
    """A request failed after it was admitted."""


class SlotFailedError(GenerationError):
    """The slot serving this request crashed; the request failed, the slot was restarted."""


class ReplicaLostError(GenerationError):
    """The replica serving this request (runtime.ray_serve) died or went away after the
    request's first chunk was sent; before it, the request is retried on another replica."""


def preview(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages: a message names the
    offending value without echoing a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
