"""How an error becomes an HTTP answer: status code, headers and a short code (each API writes
its own body around the message: Ollama's ``{"error": ...}``, OpenAI's error object).

=================================================  =====================
error                                              status
=================================================  =====================
InvalidRequestError                                400
ContextOverflowError                               400, code ``context_length_exceeded`` (OpenAI's)
EmbeddingsUnsupportedError                         400, code ``embeddings_unsupported``
HTTPException raised by the server (unknown        its own (404, 413)
model, body too large)
QueueFullError                                     503 with Retry-After (predicted where measured)
TenantQueueFullError (tenant_max_queued)           429 with Retry-After, code ``tenant_queue_full``
DeadlineUnmetError (deadline_ms missed)            503 with the predicted Retry-After, code ``deadline_unmet``
ModelMemoryError (a model that cannot fit)         503, code ``insufficient_memory``
ModelNotFoundError                                 404, code ``model_not_found``
RuntimeClosedError (loading, closing)              503 with Retry-After
RuntimeFailedError                                 503
GenerationError (a slot crashed mid-request)       500
ClientDisconnect (gone while sending the body)     499 (nginx's; nobody reads it)
anything else (a bug; logged)                      500
=================================================  =====================

Bad input never gives 500: it is refused as InvalidRequestError before it reaches the runtime.
"""

from __future__ import annotations

import logging
import math

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from runtime.core.errors import (
    ContextOverflowError,
    DeadlineUnmetError,
    EmbeddingsUnsupportedError,
    GenerationError,
    InvalidRequestError,
    ModelMemoryError,
    ModelNotFoundError,
    QueueFullError,
    RuntimeClosedError,
    RuntimeFailedError,
    TenantQueueFullError,
    preview,
)

__all__ = ["HttpError", "http_error", "model_not_found"]

log = logging.getLogger("slotserve.server")

_CODES = {
    400: "invalid_request", 404: "model_not_found", 405: "method_not_allowed", 408: "request_timeout",
    413: "body_too_large",
}  # fmt: skip


class HttpError(msgspec.Struct, frozen=True, kw_only=True):
    """An error as HTTP sees it: ``status``, a message naming the problem, extra headers, and a
    short machine-readable ``code`` (``invalid_request``, ``queue_full``, ...)."""

    status: int
    message: str
    code: str
    headers: dict[str, str] = msgspec.field(default_factory=dict)


def model_not_found(name: str, served: str) -> HTTPException:
    """The 404 for a request that names a model this server does not serve."""
    return HTTPException(404, f"model {preview(name)} not found; this server serves {served!r}")


def http_error(exc: BaseException, retry_after_s: int) -> HttpError:
    """The HTTP answer for ``exc``; ``retry_after_s`` goes in Retry-After where retrying helps."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, ContextOverflowError):  # the code and the words OpenAI's clients read as "too long"
        message = f"This model's maximum context length is {exc.n_ctx_per_slot:,} tokens: {exc}"
        return HttpError(status=400, message=message, code="context_length_exceeded")
    if isinstance(exc, EmbeddingsUnsupportedError):
        return HttpError(status=400, message=str(exc), code="embeddings_unsupported")
    if isinstance(exc, InvalidRequestError):
        return HttpError(status=400, message=str(exc), code="invalid_request")
    if isinstance(exc, HTTPException):
        code = _CODES.get(exc.status_code, "http_error")
        return HttpError(
            status=exc.status_code, message=exc.detail, code=code, headers=dict(exc.headers or {})
        )
    if isinstance(exc, QueueFullError):  # Retry-After is whole seconds (RFC 9110): the prediction rounded up
        if exc.retry_after_s is not None:
            retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        if isinstance(exc, TenantQueueFullError):
            return HttpError(status=429, message=str(exc), code="tenant_queue_full", headers=retry)
        if isinstance(exc, DeadlineUnmetError):
            return HttpError(status=503, message=str(exc), code="deadline_unmet", headers=retry)
        return HttpError(status=503, message=f"server busy: {exc}", code="queue_full", headers=retry)
    if isinstance(exc, ModelMemoryError):
        return HttpError(status=503, message=str(exc), code="insufficient_memory")
    if isinstance(exc, ModelNotFoundError):
        return HttpError(status=404, message=str(exc), code="model_not_found")
    if isinstance(exc, RuntimeFailedError):
        return HttpError(status=503, message=str(exc), code="runtime_failed")
    if isinstance(exc, RuntimeClosedError):
        return HttpError(status=503, message=str(exc), code="unavailable", headers=retry)
    if isinstance(exc, ClientDisconnect):  # gone while sending its body; nobody reads the answer
        return HttpError(status=499, message="the client closed the request", code="client_closed")
    if isinstance(exc, GenerationError):
        return HttpError(status=500, message=str(exc), code="generation_failed")
    log.error("unexpected error while serving a request", exc_info=exc)
    return HttpError(status=500, message=f"internal error ({type(exc).__name__})", code="internal")
