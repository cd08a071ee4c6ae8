"""Ollama's model endpoints: GET /api/tags, GET /api/ps, POST /api/show and GET /api/version,
written as Ollama writes them (its ``api/types.go`` and ``server/routes.go``).

- /api/tags lists the one model under each of its names as ``name:latest`` (the primary name,
  the file's name, ``default``, ``slotserve``), each with the file's size on disk, its SHA-256
  as ``digest``, its modification time and ``details``.
- /api/ps lists it while it is loaded (ready, draining or failed): ``size`` is the weights plus
  every slot's KV cache (bytes), ``size_vram`` the same when its layers are on a GPU (else 0),
  ``context_length`` the slot's context, ``expires_at`` far in the future (the server start
  plus the longest Go duration, what Ollama shows for ``keep_alive: -1``: the model is never
  unloaded while the server runs), and a ``slotserve`` object with our slots and queue.
- /api/show (POST ``{"model"}`` or the older ``{"name"}``, and GET with the same as query
  parameters for clients that send that) answers ``details``, ``model_info`` (the GGUF
  metadata without ``general.name`` and ``tokenizer.chat_template``, as Ollama; arrays of more
  than 5 items empty unless ``verbose``), ``template`` (the model's own chat template: Jinja,
  not a Go template), ``parameters`` (the slot's ``num_ctx`` and the sampling defaults, one
  ``key value`` line each, as Ollama's Modelfile parameters), ``modelfile``, ``license``,
  ``capabilities`` and ``modified_at``.
- /api/version answers OLLAMA_VERSION, the Ollama release whose API this server follows (clients
  gate features on it), and slotserve's own version in ``slotserve_version`` (versions.py).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runtime.backends.base import Backend, MetadataValue
from runtime.core.errors import InvalidRequestError
from runtime.core.messages import GenerateRequest
from runtime.server.context import ServerContext
from runtime.server.model_facts import details
from runtime.server.ollama_api import OLLAMA_ERRORS
from runtime.server.versions import OLLAMA_VERSION, slotserve_version

__all__ = ["OllamaModelsApi", "OllamaShowBody", "capabilities"]

_encode = msgspec.json.encode
_GO_MAX_DURATION_S = (2**63 - 1) / 1e9
"""Go's longest time.Duration in seconds (292 years): Ollama's expiry for ``keep_alive: -1``."""
_HIDDEN_KEYS = ("general.name", "tokenizer.chat_template")
"""Metadata Ollama's /api/show leaves out of model_info (the template has a field of its own)."""
_DEFAULTS = GenerateRequest(prompt="x")
_PARAMETERS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n")


def capabilities(embedding_length: int = 0, *, tools: bool = False) -> list[str]:
    """Ollama's ``capabilities`` of the served model: what the server can do with it.

    ``completion``; ``tools`` where the backend constrains output and the model has a chat
    template (tool calls: runtime.core.tools); ``embedding`` where the backend embeds
    (``embedding_length`` above 0); ``insert`` once a ``suffix`` (fill-in-the-middle) is
    supported; ``vision`` never here.
    """
    return ["completion"] + (["tools"] if tools else []) + (["embedding"] if embedding_length > 0 else [])


def calls_tools(backend: Backend) -> bool:
    """Whether the served model can call tools: the backend constrains output and it has a chat template."""
    return backend.info.constraints and backend.chat_template is not None


def _iso(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).isoformat().replace("+00:00", "Z")


def _value(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class OllamaShowBody(msgspec.Struct, kw_only=True):
    """The body of POST /api/show (unknown fields are ignored, as Ollama does)."""

    model: str = ""
    name: str = ""
    """The older name of ``model``, still sent by Continue."""
    verbose: bool = False
    system: str | None = None
    template: str | None = None
    options: dict[str, Any] | None = None

    @property
    def model_name(self) -> str:
        """``model``, else ``name``.

        :raises InvalidRequestError: if both are empty (Ollama: "model is required").
        """
        if not (self.model or self.name):
            raise InvalidRequestError("model is required; give it as model (or name)")
        return self.model or self.name


class OllamaModelsApi:
    """The model endpoints of one app."""

    def __init__(self, server: ServerContext) -> None:
        self._server = server

    def routes(self) -> list[Route]:
        """The routes, each answering errors in Ollama's format (GET routes answer HEAD too)."""
        s = self._server
        return [
            Route("/api/tags", s.guarded(OLLAMA_ERRORS, self.tags), methods=["GET"]),
            Route("/api/ps", s.guarded(OLLAMA_ERRORS, self.ps), methods=["GET"]),
            Route("/api/show", s.guarded(OLLAMA_ERRORS, self.show), methods=["GET", "POST"]),
            Route("/api/version", s.guarded(OLLAMA_ERRORS, self.version), methods=["GET"]),
        ]

    async def _listing(self, name: str) -> dict[str, Any]:
        """One model of /api/tags and /api/ps."""
        s = self._server
        size = s.facts.file_bytes()
        return {
            "name": name,
            "model": name,
            "modified_at": s.facts.modified_at(s.created_s),
            "size": s.runtime.status().weights_bytes if size is None else size,
            "digest": await s.facts.digest(),
            "details": details(await s.facts.metadata(), s.runtime.config.backend),
        }

    async def tags(self, request: Request) -> Response:
        """GET /api/tags: the one model under each of its names."""
        models = [await self._listing(name) for name in self._server.names.listed()]
        return Response(_encode({"models": models}), media_type="application/json")

    async def ps(self, request: Request) -> Response:
        """GET /api/ps: the model if it is loaded, with its memory (bytes), and our slots and queue."""
        rt = self._server.runtime
        status = rt.status()
        if status.state in ("loading", "closed"):  # nothing loaded
            return Response(_encode({"models": []}), media_type="application/json")
        size = status.weights_bytes + status.slots_effective * status.kv_bytes_per_slot
        on_gpu = rt.backend.info.gpu_layers > 0
        model = await self._listing(self._server.names.listed()[0]) | {
            "size": size,
            "size_vram": size if on_gpu else 0,
            "expires_at": _iso(self._server.created_s + _GO_MAX_DURATION_S),
            "context_length": status.n_ctx_per_slot,
            "slotserve": {k: getattr(status, k) for k in _PS_FIELDS},
        }
        return Response(_encode({"models": [model]}), media_type="application/json")

    async def show(self, request: Request) -> Response:
        """/api/show: what the model is (see the module docstring).

        :raises InvalidRequestError: if no model is named or the body is malformed.
        :raises HTTPException: 404 if it names another model.
        :raises RuntimeClosedError: if the model is not loaded yet (503).
        """
        s = self._server
        if request.method == "GET":
            query = request.query_params
            verbose = query.get("verbose", "").lower() in ("1", "true")
            body = OllamaShowBody(model=query.get("model", ""), name=query.get("name", ""), verbose=verbose)
        else:
            body = await s.read(request, OllamaShowBody)
        name = body.model_name
        s.host.check_ready()
        s.names.check(name)
        meta = await s.facts.metadata(verbose=body.verbose) or {}
        answer = {
            "license": _text(meta.get("general.license")),
            "modelfile": self._modelfile(),
            "parameters": "\n".join(f"{k:<30} {v}" for k, v in self._parameters()),
            "template": _text(meta.get("tokenizer.chat_template")),
            "details": details(meta, s.runtime.config.backend),
            "model_info": {k: meta[k] for k in sorted(meta) if k not in _HIDDEN_KEYS},
            "capabilities": capabilities(
                s.runtime.backend.info.embedding_length, tools=calls_tools(s.runtime.backend)
            ),
            "modified_at": s.facts.modified_at(s.created_s),
        }
        return Response(_encode(answer), media_type="application/json")

    def _parameters(self) -> list[tuple[str, str]]:
        """The slot's context and the sampling defaults a request without options gets."""
        n_ctx = self._server.runtime.config.n_ctx_per_slot
        return [("num_ctx", str(n_ctx)), *((k, _value(getattr(_DEFAULTS, k))) for k in _PARAMETERS)]

    def _modelfile(self) -> str:
        """An Ollama Modelfile that would build this model (Ollama reads the chat template from
        the GGUF itself)."""
        path = self._server.facts.file()
        lines = ["# Modelfile generated by slotserve", f"FROM {path or self._server.names.primary}"]
        lines += [f"PARAMETER {k} {v}" for k, v in self._parameters()]
        return "\n".join(lines) + "\n"

    async def version(self, request: Request) -> Response:
        """GET /api/version: OLLAMA_VERSION, and slotserve's own in ``slotserve_version``."""
        body = {"version": OLLAMA_VERSION, "slotserve_version": slotserve_version()}
        return Response(_encode(body), media_type="application/json")


def _text(value: MetadataValue | None) -> str:
    return value if isinstance(value, str) else ""


_PS_FIELDS = (
    "state", "failure", "backend", "n_ctx_per_slot", "kv_bytes_per_slot", "slots_configured", "slots_effective",
    "slots_busy", "queue_depth", "queue_capacity", "requests_admitted", "requests_completed",
    "requests_cancelled", "requests_failed", "requests_rejected", "restarts", "queue",
)  # fmt: skip
"""RuntimeStatus fields /api/ps adds under ``slotserve``: our slots and queue (``queue``: each
waiting request's position, priority, tenant, seconds waited and predicted start)."""
