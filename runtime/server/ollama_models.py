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
from pathlib import Path
from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runtime.backends.base import MetadataValue
from runtime.backends.gguf_metadata import read_gguf_metadata
from runtime.core.errors import InvalidRequestError, ModelLoadError
from runtime.core.messages import GenerateRequest
from runtime.server.context import ServerContext
from runtime.server.model_facts import SHOWN_ARRAY_ITEMS, details, registry_listing
from runtime.server.ollama_api import OLLAMA_ERRORS
from runtime.server.served import ServedBackend, replicas_of
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


def calls_tools(backend: ServedBackend) -> bool:
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
        """GET /api/tags: the default model under each of its names, then every registry
        model, loaded or not."""
        names = self._server.names
        models = [await self._listing(name) for name in names.listed()]
        backend = self._server.runtime.config.backend
        for name in names.registry_listed():
            spec = self._server.runtime.models.get(name)
            models.append(await registry_listing(name, spec.path, backend, self._server.created_s))
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
        if (replicas := replicas_of(rt)) is not None:  # the application's replicas, each with its figures
            model["slotserve"]["replicas"] = replicas
        models = [model]
        for loaded in rt.loaded_models()[1:]:  # the registry's, loading or loaded
            listing = await registry_listing(
                f"{loaded.name}:latest", loaded.path, rt.config.backend, self._server.created_s
            )
            expires = loaded.expires_at_unix_s
            models.append(listing | {
                "size": loaded.size_bytes,
                "size_vram": loaded.size_vram_bytes,
                "expires_at": _iso(self._server.created_s + _GO_MAX_DURATION_S if expires is None else expires),
                "context_length": loaded.n_ctx_per_slot,
                "slotserve": {"state": loaded.state, "slots_effective": loaded.slots, "slots_busy": loaded.slots_busy,
                              "pinned": loaded.pinned, "n_ctx_per_slot": loaded.n_ctx_per_slot,
                              "queue_depth": loaded.queue_depth, "queue": loaded.queue},
            })  # fmt: skip
        return Response(_encode({"models": models}), media_type="application/json")

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
        routed = s.names.route(name)
        if routed is not None:  # a registry model: read from its file, loaded or not
            meta, backend, path, modified = await self._registry_facts(routed, verbose=body.verbose)
        else:
            meta = await s.facts.metadata(verbose=body.verbose) or {}
            backend, path = s.runtime.backend, s.facts.file()
            modified = s.facts.modified_at(s.created_s)
        answer = {
            "license": _text(meta.get("general.license")),
            "modelfile": self._modelfile(path, s.n_ctx_per_slot(name)),
            "parameters": "\n".join(f"{k:<30} {v}" for k, v in self._parameters(s.n_ctx_per_slot(name))),
            "template": _text(meta.get("tokenizer.chat_template")),
            "details": details(meta, s.runtime.config.backend),
            "model_info": {k: meta[k] for k in sorted(meta) if k not in _HIDDEN_KEYS},
            "capabilities": capabilities(
                backend.info.embedding_length if backend else 0,
                tools=calls_tools(backend) if backend else False,
            ),
            "modified_at": modified,
        }
        return Response(_encode(answer), media_type="application/json")

    async def _registry_facts(
        self, name: str, *, verbose: bool
    ) -> tuple[dict[str, MetadataValue], ServedBackend | None, Path | None, str]:
        """(metadata, its backend if loaded, file, modified_at) of a registry model."""
        s = self._server
        path: Path | None = Path(s.runtime.models.get(name).path)
        listing = await registry_listing(
            name, s.runtime.models.get(name).path, s.runtime.config.backend, s.created_s
        )
        items = None if verbose else SHOWN_ARRAY_ITEMS
        try:
            meta = await anyio.to_thread.run_sync(
                lambda: read_gguf_metadata(str(path), max_array_items=items)
            )
        except ModelLoadError:  # not a file here (a fake backend's name)
            meta, path = {}, None
        return meta, s.runtime.loaded_backend(name), path, str(listing["modified_at"])

    def _parameters(self, n_ctx: int) -> list[tuple[str, str]]:
        """The slot's context and the sampling defaults a request without options gets."""
        return [("num_ctx", str(n_ctx)), *((k, _value(getattr(_DEFAULTS, k))) for k in _PARAMETERS)]

    def _modelfile(self, path: Path | None, n_ctx: int) -> str:
        """An Ollama Modelfile that would build this model (Ollama reads the chat template from
        the GGUF itself)."""
        lines = ["# Modelfile generated by slotserve", f"FROM {path or self._server.names.primary}"]
        lines += [f"PARAMETER {k} {v}" for k, v in self._parameters(n_ctx)]
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
