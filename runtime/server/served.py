"""What the HTTP app needs of the runtime it serves: a small protocol that a Runtime satisfies,
and that a runtime elsewhere (replicas on Ray Serve, runtime.ray_serve) can satisfy too, so the
routes are written once.

::

    ServedRuntime       config, registry, models, state, status(), backend (info, pieces,
                        metadata), loaded_backend(), loaded_models(), load(), unload(),
                        generate(), generate_choices(), embed(), async with
    ReplicatedRuntime   a ServedRuntime of several replicas: replicas() for /health and /api/ps
    ChunkStream         what generate() returns: an async iterator of Chunks (ResponseStream)
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self

import msgspec
from prometheus_client import CollectorRegistry

from runtime.backends.base import ModelInfo
from runtime.backends.gguf_metadata import MetadataValue
from runtime.core.choices import ChoiceStream
from runtime.core.config import RuntimeConfig
from runtime.core.durations import KeepAlive
from runtime.core.messages import ChatRequest, Chunk, Embeddings, EmbedRequest, GenerateRequest
from runtime.core.records import RuntimeState, RuntimeStatus
from runtime.core.registry import ModelRegistry
from runtime.core.residency import LoadedModel

__all__ = [
    "ChunkStream",
    "ReplicaStatus",
    "ReplicatedRuntime",
    "ServedBackend",
    "ServedRuntime",
    "replicas_of",
]


class ChunkStream(Protocol):
    """One request's chunks (a ResponseStream is one): leaving ``async with`` cancels it."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def __aiter__(self) -> Self: ...

    async def __anext__(self) -> Chunk:
        """The next chunk; raises the request's error, if it failed."""
        ...

    def available(self) -> list[Chunk]:
        """The chunks that have arrived, without waiting."""
        ...

    @property
    def request(self) -> GenerateRequest | ChatRequest:
        """The request this stream answers."""
        ...


class ServedBackend(Protocol):
    """The loaded model as the app sees it."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def pieces(self) -> Sequence[bytes]:
        """Token id -> its bytes (the text of log-probabilities)."""
        ...

    def metadata(self, *, max_array_items: int | None = None) -> dict[str, MetadataValue]:
        """The model's GGUF metadata (blocking: the app calls it in a worker thread)."""
        ...

    @property
    def chat_template(self) -> object | None:
        """The model's chat template (a ChatTemplate where the model runs in this process);
        None if it has none. The app only asks whether there is one."""
        ...


class ServedRuntime(Protocol):
    """A runtime as the HTTP app sees it (a Runtime is one)."""

    @property
    def config(self) -> RuntimeConfig: ...

    @property
    def registry(self) -> CollectorRegistry:
        """What /metrics exposes."""
        ...

    @property
    def models(self) -> ModelRegistry:
        """The servable models, by name."""
        ...

    @property
    def state(self) -> RuntimeState: ...

    @property
    def backend(self) -> ServedBackend:
        """The default model's. :raises RuntimeClosedError: while nothing is loaded."""
        ...

    def loaded_backend(self, model: str | None) -> ServedBackend | None:
        """``model``'s backend if it is loaded (None: the default model's), else None."""
        ...

    def loaded_models(self) -> list[LoadedModel]:
        """The models loading or loaded, the default model first."""
        ...

    async def load(self, model: str, keep_alive: KeepAlive = None) -> None:
        """Load ``model`` (Ollama's empty prompt); raises as Runtime.load."""
        ...

    async def unload(self, model: str) -> bool:
        """Unload ``model`` when idle (Ollama's keep_alive 0); whether it was loaded."""
        ...

    def status(self) -> RuntimeStatus: ...

    def generate(
        self,
        request: GenerateRequest | ChatRequest,
        *,
        model: str | None = None,
        keep_alive: KeepAlive = None,
    ) -> ChunkStream:
        """Admit ``request`` for ``model``; raises as Runtime.generate."""
        ...

    def generate_choices(
        self, request: GenerateRequest | ChatRequest, n: int, *, model: str | None = None
    ) -> ChoiceStream:
        """Admit ``n`` choices of ``request``; raises as Runtime.generate_choices."""
        ...

    async def embed(
        self, inputs: EmbedRequest, *, model: str | None = None, keep_alive: KeepAlive = None
    ) -> Embeddings:
        """Embed with ``model``; raises as Runtime.embed."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class ReplicaStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One replica of a replicated runtime, as /health and /api/ps list it; counts in slots and
    requests."""

    id: str
    """The replica's id (Ray Serve's replica id)."""
    state: RuntimeState
    node: str = ""
    """Where it runs (a node id or host name)."""
    slots: int = 0
    """Slots running now (slots_effective)."""
    busy: int = 0
    """Slots serving a request."""
    queue: int = 0
    """Requests waiting in its mailbox."""
    queue_capacity: int = 0
    admitted: int = 0
    """Requests it has admitted since it started."""
    failure: str | None = None


class ReplicatedRuntime(ServedRuntime, Protocol):
    """A runtime made of replicas: each one's figures for /health and /api/ps."""

    def replicas(self) -> list[ReplicaStatus]:
        """Every replica known now, in a stable order."""
        ...


def replicas_of(runtime: ServedRuntime) -> list[dict[str, object]] | None:
    """The replicas of a ReplicatedRuntime as JSON objects; None for a runtime alone. (Not an
    isinstance check: on Python 3.11 that reads every property, and ``backend`` raises while
    loading.)"""
    replicas = getattr(runtime, "replicas", None)
    if replicas is None:
        return None
    listed: list[dict[str, object]] = msgspec.to_builtins(replicas())
    return listed
