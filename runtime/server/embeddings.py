"""The embedding endpoints: Ollama's POST /api/embed and /api/embeddings (legacy), and OpenAI's
POST /v1/embeddings, over ``rt.embed`` (inputs waiting together share one decode).

- /api/embed: ``input`` a string or a list of strings, ``truncate`` (default true: an input
  longer than the slot's context is cut to it; false: 400), ``dimensions`` (0 or at least the
  model's width: every dimension; fewer: the first ``dimensions``, normalised again, as Ollama
  does), ``keep_alive`` as for generating (how long a registry model stays loaded once idle),
  ``options`` ignored. Answers
  ``{model, embeddings, total_duration, load_duration, prompt_eval_count}``, the vectors
  L2-normalised. An empty ``input`` ("" or []) answers no embeddings, as Ollama does (a client's
  way to load the model); an empty string in a list is a 400.
- /api/embeddings: ``prompt`` -> ``{"embedding": [...]}``, the pooled vector not normalised
  (as Ollama's legacy endpoint answers it), cut to the context; an empty prompt answers ``[]``.
- /v1/embeddings: ``input`` a string, a list of strings, a token array or a list of token
  arrays (at most 2,048 inputs, none empty); ``encoding_format`` ``float`` or ``base64`` (the
  vector's little-endian float32 bytes, as OpenAI encodes them; the openai client asks for it by
  default); ``dimensions`` (1 to the model's width); ``user`` ignored. An input longer than the
  slot's context is a 400 with code ``context_length_exceeded`` (OpenAI does not truncate).
  Answers ``{object: list, data: [{object: embedding, index, embedding}], model, usage}``.

A model whose backend cannot embed answers 400 (EmbeddingsUnsupportedError), in each API's shape.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runtime.core.durations import KeepAlive
from runtime.core.errors import InvalidRequestError, preview
from runtime.core.messages import EmbedRequest
from runtime.server.context import ServerContext
from runtime.server.ollama_api import OLLAMA_ERRORS
from runtime.server.ollama_wire import keep_alive_s
from runtime.server.openai_api import OPENAI_ERRORS

__all__ = ["EmbeddingsApi", "OllamaEmbedBody", "OllamaEmbeddingsBody", "OpenAIEmbeddingBody", "openai_inputs"]

_encode = msgspec.json.encode


class OllamaEmbedBody(msgspec.Struct, kw_only=True):
    """The body of POST /api/embed (unknown fields are ignored, as Ollama does)."""

    model: str
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int = 0
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class OllamaEmbeddingsBody(msgspec.Struct, kw_only=True):
    """The body of POST /api/embeddings, Ollama's legacy form."""

    model: str
    prompt: str = ""
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class OpenAIEmbeddingBody(msgspec.Struct, kw_only=True):
    """The body of POST /v1/embeddings (unknown fields are ignored)."""

    model: str
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def openai_inputs(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's ``input`` as our inputs: a string, a list of strings, a token array (one input),
    or a list of token arrays.

    :raises InvalidRequestError: for any other shape (the message says which are taken).
    """
    shapes = "a string, a list of strings, a list of token ids or a list of lists of token ids"

    def ids(items: list[Any], where: str) -> tuple[int, ...]:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            raise InvalidRequestError(f"{where} is {preview(items)}; a token array holds integers only")
        return tuple(items)

    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return tuple(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return (ids(value, "input"),)
        if all(isinstance(v, list) for v in value):
            return tuple(ids(v, f"input[{i}]") for i, v in enumerate(value))
    if isinstance(value, list) and not value:
        raise InvalidRequestError("input is an empty list; give at least one input to embed")
    raise InvalidRequestError(f"input is {preview(value)}; it must be {shapes}")


class EmbeddingsApi:
    """The embedding endpoints of one app."""

    def __init__(self, server: ServerContext) -> None:
        self._server = server

    def routes(self) -> list[Route]:
        """The routes, each answering errors in its API's shape."""
        s = self._server
        return [
            Route("/api/embed", s.guarded(OLLAMA_ERRORS, self.ollama_embed), methods=["POST"]),
            Route("/api/embeddings", s.guarded(OLLAMA_ERRORS, self.ollama_embeddings), methods=["POST"]),
            Route("/v1/embeddings", s.guarded(OPENAI_ERRORS, self.openai_embeddings), methods=["POST"]),
        ]

    async def _width(self, model: str | None, keep_alive: float | None) -> int:
        """The embedding length of ``model`` (None: the default model), loading it first."""
        rt = self._server.runtime
        if model is not None:
            await rt.load(model, keep_alive)
        backend = rt.loaded_backend(model)
        return backend.info.embedding_length if backend is not None else 0

    async def ollama_embed(self, request: Request) -> Response:
        """POST /api/embed (see the module docstring).

        :raises InvalidRequestError: bad input, or a model that cannot embed (400).
        """
        s = self._server
        body = await s.read(request, OllamaEmbedBody)
        model = s.check(body.model)
        keep = keep_alive_s(body.keep_alive)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if body.dimensions < 0:
            raise InvalidRequestError(f"dimensions is {body.dimensions}; it must be 0 (all) or more")
        if not any(texts) and len(texts) <= 1:  # "" or []: Ollama loads the model and answers none
            return _json({"model": body.model, "embeddings": []})
        dimensions = body.dimensions if 0 < body.dimensions < await self._width(model, keep) else None
        result = await s.runtime.embed(
            EmbedRequest(inputs=tuple(texts), truncate=body.truncate, dimensions=dimensions),
            model=model, keep_alive=keep,
        )  # fmt: skip
        return _json(
            {
                "model": body.model,
                "embeddings": result.vectors,
                "total_duration": result.total_duration_ns,
                "load_duration": 0,
                "prompt_eval_count": result.prompt_tokens,
            }
        )

    async def ollama_embeddings(self, request: Request) -> Response:
        """POST /api/embeddings, the legacy form (see the module docstring)."""
        s = self._server
        body = await s.read(request, OllamaEmbeddingsBody)
        model = s.check(body.model)
        keep = keep_alive_s(body.keep_alive)
        if not body.prompt:
            return _json({"embedding": []})
        request_ = EmbedRequest(inputs=(body.prompt,), normalize=False)
        result = await s.runtime.embed(request_, model=model, keep_alive=keep)
        return _json({"embedding": result.vectors[0]})

    async def openai_embeddings(self, request: Request) -> Response:
        """POST /v1/embeddings (see the module docstring)."""
        s = self._server
        body = await s.read(request, OpenAIEmbeddingBody)
        model = s.check(body.model)
        inputs = openai_inputs(body.input)
        result = await s.runtime.embed(
            EmbedRequest(inputs=inputs, truncate=False, dimensions=body.dimensions), model=model
        )
        return _json(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": _vector(v, body.encoding_format)}
                    for i, v in enumerate(result.vectors)
                ],
                "model": body.model,
                "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
            }
        )


def _vector(vector: list[float], encoding: str) -> list[float] | str:
    """A vector as OpenAI writes it: floats, or base64 of its little-endian float32 bytes."""
    if encoding == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _json(body: dict[str, Any]) -> Response:
    return Response(_encode(body), media_type="application/json")
