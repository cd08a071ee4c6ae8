"""The ASGI app: Ollama's and OpenAI's endpoints over one Runtime, plus /health and /metrics.

::

    app = create_app(RuntimeConfig(slots=4))          # loads the model in the background
    app = create_app(running_runtime)                 # serves a runtime its owner runs

=========================  ==============================================================
GET  /                     ``slotserve is running`` (Ollama answers its name the same way)
GET  /health               200 when ready; 503 ``loading`` or ``failed: reason``
GET  /metrics              Prometheus exposition of ``runtime.registry``
POST /api/generate, /chat  Ollama (runtime.server.ollama_api)
GET  /api/tags, /ps,       Ollama's model endpoints (runtime.server.ollama_models)
     /version
POST /api/show (also GET)
POST /api/embed,           Ollama's embeddings (runtime.server.embeddings)
     /api/embeddings
POST /v1/chat/completions  OpenAI (runtime.server.openai_api)
POST /v1/completions
GET  /v1/models, /{id}
POST /v1/embeddings        OpenAI's embeddings (runtime.server.embeddings)
=========================  ==============================================================

When the app starts, the model file's digest is computed in the background (a big file takes
seconds to hash), so that the first listing need not wait for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import msgspec
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.core.config import RuntimeConfig
from runtime.core.errors import preview
from runtime.metrics import metrics_app
from runtime.runtime import Runtime
from runtime.server.context import ServerContext
from runtime.server.embeddings import EmbeddingsApi
from runtime.server.errors import HttpError
from runtime.server.host import RuntimeHost
from runtime.server.model_facts import ModelFacts
from runtime.server.names import ModelNames
from runtime.server.ollama_api import OLLAMA_ERRORS, OllamaApi
from runtime.server.ollama_models import OllamaModelsApi
from runtime.server.openai_api import OPENAI_ERRORS, OpenAIApi
from runtime.server.origins import OriginPolicy, binds_loopback
from runtime.server.served import ServedRuntime, replicas_of
from runtime.server.settings import ServerSettings
from runtime.server.versions import slotserve_version

__all__ = ["create_app"]


def create_app(
    runtime: ServedRuntime | RuntimeConfig,
    settings: ServerSettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The HTTP app serving ``runtime``.

    :param runtime: a RuntimeConfig, or a Runtime. A config, or a Runtime not yet entered, is
        started by the app in a background task when the app starts (ASGI lifespan) and
        stopped when it stops; /health answers 503 ``loading`` meanwhile. A running Runtime
        (embedding the app in a host application) is only served; its owner stops it. Any
        other ServedRuntime (replicas on Ray Serve: runtime.ray_serve) is served the same way;
        a ReplicatedRuntime's /health and /api/ps list its replicas.
    :param settings: body limit, Retry-After, served model name (host and port are the ASGI
        server's business; see :func:`runtime.server.serve`).
    :param registry: for a RuntimeConfig: the prometheus-client registry of the new Runtime
        (default: the global one).
    """
    rt = Runtime(runtime, registry=registry) if isinstance(runtime, RuntimeConfig) else runtime
    settings = settings or ServerSettings()
    host = RuntimeHost(rt)
    names = ModelNames(rt, settings.model_name)
    server = ServerContext(host=host, settings=settings, names=names, facts=ModelFacts(rt))

    async def health(request: Request) -> Response:
        problem = host.problem()
        if problem is None:
            status = rt.status()
            body: dict[str, object] = {
                "status": "ok", "model": server.names.primary, "version": slotserve_version(),
                "slots": status.slots_effective, "slots_busy": status.slots_busy,
                "queue_depth": status.queue_depth,
            }  # fmt: skip
            if (replicas := replicas_of(rt)) is not None:
                body["replicas"] = replicas
            return Response(msgspec.json.encode(body), media_type="application/json")
        state, _, reason = problem.partition(": ")
        headers = {"Retry-After": str(settings.retry_after_s)} if state in ("loading", "draining") else {}
        problem_body: dict[str, object] = {"status": state}
        if reason:
            problem_body["reason"] = reason
        return Response(
            msgspec.json.encode(problem_body), 503, headers=headers, media_type="application/json"
        )

    async def root(request: Request) -> Response:
        return PlainTextResponse("slotserve is running")

    routes: list[BaseRoute] = [
        Route("/", root, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", _AsgiEndpoint(metrics_app(rt)), methods=["GET", "HEAD"]),
        *OllamaApi(server).routes(),
        *OllamaModelsApi(server).routes(),
        *OpenAIApi(server).routes(),
        *EmbeddingsApi(server).routes(),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with host.running(), anyio.create_task_group() as tg:
            tg.start_soon(server.facts.digest)
            yield
            tg.cancel_scope.cancel()

    policy = Middleware(
        OriginPolicy,
        extra_origins=settings.origins.split(","),
        check_host=binds_loopback(settings.host),
        refusal=lambda path, message: api_error_body(
            path, HttpError(status=403, message=message, code="forbidden")
        ),
    )

    async def not_routed(request: Request, exc: Exception) -> Response:
        """Unknown paths (404) and methods (405) in the API's own error shape."""
        assert isinstance(exc, HTTPException)
        path = request.url.path
        message = f"{request.method} {preview(path)}: {exc.detail.lower()}"
        code = {404: "not_found", 405: "method_not_allowed"}[exc.status_code]
        body = api_error_body(path, HttpError(status=exc.status_code, message=message, code=code))
        return Response(body, exc.status_code, headers=dict(exc.headers or {}), media_type="application/json")

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[policy],
        exception_handlers={404: not_routed, 405: not_routed},
    )
    app.router.redirect_slashes = False  # its Location would be built from the client's Host header
    app.state.server = server
    return app


def api_error_body(path: str, error: HttpError) -> bytes:
    """``error`` in the shape of the API that ``path`` belongs to (OpenAI's under /v1/)."""
    framing = OPENAI_ERRORS if path.startswith("/v1/") else OLLAMA_ERRORS
    return framing.error(error)


class _AsgiEndpoint:
    """Wraps an ASGI app so that a Route serves it at exactly its path (a Mount would redirect
    ``/metrics`` to ``/metrics/``)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
