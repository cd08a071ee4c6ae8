"""What every endpoint shares: the runtime's host, the settings, the served names, the model's
facts (digest, metadata), and the steps each generating request takes (read the body, check
readiness and model, admit, reply).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, overload

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from runtime.core.choices import ChoiceStream
from runtime.core.errors import RuntimeClosedError
from runtime.core.messages import ChatRequest, GenerateRequest
from runtime.server.admission_headers import with_admission
from runtime.server.body import decode_body, read_body
from runtime.server.host import RuntimeHost
from runtime.server.model_facts import ModelFacts
from runtime.server.names import ModelNames
from runtime.server.ollama_wire import keep_alive_s as keep_alive_seconds
from runtime.server.reply import Framing, ReplyResponse, error_response
from runtime.server.served import ChunkStream, ServedRuntime
from runtime.server.settings import ServerSettings

__all__ = ["ServerContext"]

T = TypeVar("T")
_DECODE_ON_LOOP_BYTES = 64 << 10
"""Bodies up to this size are decoded on the event loop (tens of microseconds); larger ones in
a worker thread."""
Endpoint = Callable[[Request], Awaitable[Response | ReplyResponse]]
ModelAction = Callable[[str | None], Awaitable[Response]]
"""Something an endpoint does to the model a request names (its registry name; None: the
default model) instead of generating: Ollama's load or unload by an empty prompt."""


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
    def runtime(self) -> ServedRuntime:
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

    def check(self, model: str) -> str | None:
        """Check that the runtime takes requests and that ``model`` names a served model.

        :returns: the registry name it routes to (None: the default model).
        :raises RuntimeClosedError: if it is loading or closed (RuntimeFailedError if failed).
        :raises HTTPException: 404 if ``model`` is not a name of a served model.
        """
        self.host.check_ready()
        return self.names.route(model)

    def n_ctx_per_slot(self, model: str) -> int:
        """The slot context of the model ``model`` names (its own setting, else the runtime's).

        :raises HTTPException: 404 if it names no served model.
        """
        name = self.names.route(model)
        spec = None if name is None else self.runtime.models.get(name)
        if spec is None or spec.n_ctx_per_slot is None:
            return self.runtime.config.n_ctx_per_slot
        return spec.n_ctx_per_slot

    def pieces(self, model: str) -> Sequence[bytes]:
        """Each token id's bytes of the model ``model`` names, read when first used (a model
        still loading has none yet); empty for a name that routes nowhere."""
        return _Pieces(self.runtime, model, self.names)

    def reply(
        self,
        request: GenerateRequest | ChatRequest,
        framing: Framing,
        *,
        streaming: bool,
        n: int = 1,
        model: str | None = None,
        keep_alive_s: float | None = None,
    ) -> ReplyResponse:
        """Admit ``request`` now for ``model`` (a registry name; None: the default model), ``n``
        choices of it, each in a slot, and answer with its stream.

        :raises QueueFullError: if the mailbox is full (has no room for all ``n``).
        :raises InvalidRequestError: if max_tokens is over ``max_tokens_cap``, or ``n`` is over
            the slots.
        :raises ModelMemoryError: if the model cannot fit (503).
        """
        rt = self.runtime
        stream: ChunkStream | ChoiceStream
        if n == 1:
            stream = rt.generate(request, model=model, keep_alive=keep_alive_s)
        else:
            stream = rt.generate_choices(request, n, model=model)
        return ReplyResponse(stream, framing, streaming=streaming, retry_after_s=self.settings.retry_after_s)

    def generation(
        self,
        kind: type[B],
        to_request: Callable[[B], GenerateRequest | ChatRequest | Response | ModelAction],
        framing: Callable[[B], Framing],
        choices: Callable[[B], int] | None = None,
    ) -> Endpoint:
        """An endpoint that generates: read a ``kind`` body, check readiness and its model, make
        the request with ``to_request`` (which may answer by itself with a Response, or with a
        ModelAction run on the model's registry name: a load or unload), admit it
        (``choices(body)`` choices of it, where given) and reply in the body's ``framing``,
        streamed as the body's ``stream`` says.

        The endpoint raises what :meth:`read`, :meth:`check` and :meth:`reply` raise.
        """

        async def endpoint(request: Request) -> Response | ReplyResponse:
            body = await self.read(request, kind)
            model = self.check(body.model)
            if _constrains(body):  # compiling a new schema may take a second: not on the loop
                req = await anyio.to_thread.run_sync(to_request, body)
            else:
                req = to_request(body)
            if isinstance(req, Response):
                return req
            if not isinstance(req, GenerateRequest | ChatRequest):
                return await req(model)
            user = getattr(body, "user", None)  # OpenAI's: it names the tenant
            req = with_admission(req, request.headers, user, self.settings.max_client_priority)
            n = 1 if choices is None else choices(body)
            keep_alive_s = keep_alive_seconds(getattr(body, "keep_alive", None))
            return self.reply(
                req, framing(body), streaming=body.stream, n=n, model=model, keep_alive_s=keep_alive_s
            )

        return endpoint

    def guarded(self, framing: Framing, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` with every error it raises answered in ``framing``'s error format."""

        async def guarded_endpoint(request: Request) -> Response | ReplyResponse:
            try:
                return await endpoint(request)
            except Exception as exc:
                return error_response(exc, framing, self.settings.retry_after_s)

        return guarded_endpoint


_CONSTRAINT_FIELDS = ("format", "response_format", "tools")


def _constrains(body: object) -> bool:
    """Whether a body asks for an output constraint (a schema, tools) that validating compiles."""
    return any(getattr(body, name, None) for name in _CONSTRAINT_FIELDS)


class _Pieces(Sequence[bytes]):
    """A model's token pieces, looked up when first read (the model may still be loading when a
    reply's framing is made)."""

    def __init__(self, runtime: ServedRuntime, model: str, names: ModelNames) -> None:
        self._runtime = runtime
        self._model = model
        self._names = names
        self._pieces: Sequence[bytes] | None = None

    def _get(self) -> Sequence[bytes]:
        if self._pieces is None:
            try:
                backend = self._runtime.loaded_backend(self._names.route(self._model))
            except HTTPException:  # a name that routes nowhere is refused before any token
                return ()
            if backend is None:
                return ()
            self._pieces = backend.pieces
        return self._pieces

    def __len__(self) -> int:
        return len(self._get())

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        return self._get()[index]
