"""What every endpoint shares: the runtime's host, the settings, the served names, the model's
facts (digest, metadata), and the steps each generating request takes (read the body, check
readiness and model, admit, reply).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from runtime.core.choices import ChoiceStream
from runtime.core.errors import RuntimeClosedError
from runtime.core.messages import ChatRequest, GenerateRequest
from runtime.core.ticket import ResponseStream
from runtime.runtime import Runtime
from runtime.server.admission_headers import with_admission
from runtime.server.body import decode_body, read_body
from runtime.server.host import RuntimeHost
from runtime.server.model_facts import ModelFacts
from runtime.server.names import ModelNames
from runtime.server.reply import Framing, ReplyResponse, error_response
from runtime.server.settings import ServerSettings

__all__ = ["ServerContext"]

T = TypeVar("T")
_DECODE_ON_LOOP_BYTES = 64 << 10
"""Bodies up to this size are decoded on the event loop (tens of microseconds); larger ones in
a worker thread."""
Endpoint = Callable[[Request], Awaitable[Response | ReplyResponse]]


class GenerationBody(Protocol):
    """What every generating endpoint's body has."""

    @property
    def model(self) -> str: ...

    @property
    def stream(self) -> bool: ...


B = TypeVar("B", bound=GenerationBody)


@dataclass(eq=False)
class ServerContext:
    """The state one app's endpoints share."""

    host: RuntimeHost
    settings: ServerSettings
    names: ModelNames
    facts: ModelFacts
    created_s: int = field(default_factory=lambda: int(time.time()))
    """Unix time (seconds) the app was made; OpenAI's ``created`` of the model."""
    _reading: set[anyio.CancelScope] = field(default_factory=set)
    _stopping: bool = False

    @property
    def runtime(self) -> Runtime:
        """The served runtime."""
        return self.host.runtime

    async def read(self, request: Request, kind: type[T]) -> T:
        """The request body decoded into ``kind``.

        :raises HTTPException: 413 if the body is over ``max_body_bytes``; 408 if it did not
            arrive within ``body_timeout_s``.
        :raises RuntimeClosedError: if the server is stopping (before or while the body arrives).
        :raises InvalidRequestError: if it is empty, not JSON, or of the wrong shape.
        """
        body = await self._receive(request)
        if len(body) <= _DECODE_ON_LOOP_BYTES:
            return decode_body(body, kind)
        return await anyio.to_thread.run_sync(decode_body, body, kind)  # up to ~0.1 s a MiB: not on the loop

    async def _receive(self, request: Request) -> bytes:
        timeout_s = self.settings.body_timeout_s
        if self._stopping:
            raise RuntimeClosedError("the server is shutting down; retry on another instance or later")
        with anyio.CancelScope() as scope:
            self._reading.add(scope)
            try:
                with anyio.fail_after(timeout_s):
                    return await read_body(request, self.settings.max_body_bytes)
            except TimeoutError:
                message = f"the request body did not arrive within {timeout_s:g} s (body_timeout_s)"
                raise HTTPException(
                    408, message, headers={"Connection": "close"}
                ) from None  # the rest is unread
            finally:
                self._reading.discard(scope)
        raise RuntimeClosedError("the server is shutting down; retry on another instance or later")

    def stop_reading(self) -> None:
        """The server is stopping: bodies still arriving are answered 503, new ones at once."""
        self._stopping = True
        for scope in list(self._reading):
            scope.cancel()

    def check(self, model: str) -> None:
        """Check that the runtime takes requests and that ``model`` names the served model.

        :raises RuntimeClosedError: if it is loading or closed (RuntimeFailedError if failed).
        :raises HTTPException: 404 if ``model`` is not a name of the served model.
        """
        self.host.check_ready()
        self.names.check(model)

    def reply(
        self, request: GenerateRequest | ChatRequest, framing: Framing, *, streaming: bool, n: int = 1
    ) -> ReplyResponse:
        """Admit ``request`` now (``n`` choices of it, each in a slot) and answer with its stream.

        :raises QueueFullError: if the mailbox is full (has no room for all ``n``).
        :raises InvalidRequestError: if max_tokens is over ``max_tokens_cap``, or ``n`` is over
            the slots.
        """
        stream: ResponseStream | ChoiceStream
        stream = self.runtime.generate(request) if n == 1 else self.runtime.generate_choices(request, n)
        return ReplyResponse(stream, framing, streaming=streaming, retry_after_s=self.settings.retry_after_s)

    def generation(
        self,
        kind: type[B],
        to_request: Callable[[B], GenerateRequest | ChatRequest | Response],
        framing: Callable[[B], Framing],
        choices: Callable[[B], int] | None = None,
    ) -> Endpoint:
        """An endpoint that generates: read a ``kind`` body, check readiness and its model, make
        the request with ``to_request`` (which may answer by itself with a Response), admit it
        (``choices(body)`` choices of it, where given) and reply in the body's ``framing``,
        streamed as the body's ``stream`` says.

        The endpoint raises what :meth:`read`, :meth:`check` and :meth:`reply` raise.
        """

        async def endpoint(request: Request) -> Response | ReplyResponse:
            body = await self.read(request, kind)
            self.check(body.model)
            req = to_request(body)
            if isinstance(req, Response):
                return req
            user = getattr(body, "user", None)  # OpenAI's: it names the tenant
            req = with_admission(req, request.headers, user, self.settings.max_client_priority)
            n = 1 if choices is None else choices(body)
            return self.reply(req, framing(body), streaming=body.stream, n=n)

        return endpoint

    def guarded(self, framing: Framing, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` with every error it raises answered in ``framing``'s error format."""

        async def guarded_endpoint(request: Request) -> Response | ReplyResponse:
            try:
                return await endpoint(request)
            except Exception as exc:
                return error_response(exc, framing, self.settings.retry_after_s)

        return guarded_endpoint
