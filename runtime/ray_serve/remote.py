"""RemoteRuntime: the Engine replicas seen as one ServedRuntime, so the HTTP app (runtime.server)
serves them with its own routes.

- Admission is exact at the Ingress: a request is refused (QueueFullError, a 503 with
  Retry-After) when the requests this Ingress has in flight fill every ready replica's slots and
  mailbox (their figures from the Board, refreshed every ``refresh_s``). Serve's own
  BackPressureError (its caller queue, bounded by ``max_queued_requests``) reads the same way.
- A replica that dies (or drains) before a request's first chunk: the request is sent again,
  Serve's router picks another replica. After the first chunk the stream ends with
  ReplicaLostError, which the app sends in-band.
- /health, /api/ps and /metrics read the Board's snapshot: every replica's figures, and its
  Prometheus series with a ``replica`` label.
- One model: the replicas serve the default model (``models`` lists it alone); loading and
  unloading by name is a single server's (runtime.runtime), not the application's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import msgspec
from prometheus_client import CollectorRegistry
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from runtime.backends.base import ModelInfo
from runtime.backends.gguf_metadata import MetadataValue
from runtime.core.choices import MAX_CHOICES, ChoiceStream
from runtime.core.config import RuntimeConfig
from runtime.core.durations import KeepAlive
from runtime.core.errors import (
    GenerationError,
    InvalidRequestError,
    QueueFullError,
    ReplicaLostError,
    RuntimeClosedError,
)
from runtime.core.messages import SEED_LIMIT, ChatRequest, Embeddings, EmbedRequest, GenerateRequest
from runtime.core.records import RuntimeState, RuntimeStatus
from runtime.core.registry import ModelRegistry
from runtime.core.residency import LoadedModel
from runtime.ray_serve.engine import EngineFacts
from runtime.ray_serve.series import ReplicaSeries
from runtime.ray_serve.stream import LOST, RETRY_BACKOFF_S, RemoteStream, backpressure_error
from runtime.ray_serve.wire import ReplicaReport, WireError, error_from_wire
from runtime.server.model_facts import SHOWN_ARRAY_ITEMS
from runtime.server.served import ReplicaStatus

__all__ = ["TEMPLATE_ON_REPLICAS", "RemoteBackend", "RemoteRuntime"]

TEMPLATE_ON_REPLICAS = "the chat template renders on the Engine replicas"
"""RemoteBackend.chat_template where the model has one: the app only asks whether it has."""

log = logging.getLogger("slotserve.ray")

_SUMMED = (
    "slots_configured", "slots_effective", "slots_target", "slots_busy", "queue_depth", "queue_capacity",
    "requests_admitted", "requests_in_flight", "requests_completed", "requests_cancelled", "requests_failed",
    "requests_rejected", "restarts", "steps", "resizes",
)  # fmt: skip
"""RuntimeStatus fields that add up over the replicas (the rest are the first replica's)."""


class RemoteRuntime:
    """The Engine deployment's replicas as one ServedRuntime (see the module docstring).

    :param engine: a handle to the Engine deployment.
    :param board: a handle to the Board deployment.
    :param config: the replicas' RuntimeConfig (what the API's options are checked against).
    :param refresh_s: how often the Board's snapshot is read.
    :param retries: how many times a request whose replica went away before its first chunk is
        sent again.
    """

    def __init__(
        self,
        engine: DeploymentHandle[Any],
        board: DeploymentHandle[Any],
        config: RuntimeConfig,
        *,
        refresh_s: float = 0.5,
        retries: int = 3,
    ) -> None:
        self.config = config
        self.models = ModelRegistry.load(msgspec.structs.replace(config, models_dir=None))
        """The default model alone (the replicas serve one model)."""
        self.registry = CollectorRegistry()
        self.registry.register(ReplicaSeries(self.reports))
        self._engine = engine
        self._stream_engine = engine.options(stream=True)
        self._board = board
        self._refresh_s = refresh_s
        self.retries = retries
        self._facts: EngineFacts | None = None
        self._reports: list[ReplicaReport] = []
        self._closed = False
        self._in_flight = 0
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._refresh_forever)
        while self._facts is None:  # the Engine's first replica may still be loading
            try:
                self._facts = await self._engine.facts.remote(SHOWN_ARRAY_ITEMS)
            except (RayError, RayServeException) as exc:
                log.info("waiting for an Engine replica (%s)", type(exc).__name__)
                await anyio.sleep(self._refresh_s)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await anyio.sleep(self._refresh_s)

    async def refresh(self) -> None:
        """Read the Board's snapshot now (kept as it was if the Board does not answer)."""
        try:
            self._reports = await self._board.snapshot.remote()
        except (RayError, RayServeException) as exc:
            log.debug("the Board did not answer (%s)", exc)

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> RuntimeState:
        """``ready`` while any replica is; ``failed`` when every replica has failed."""
        if self._closed:
            return "closed"
        if self._facts is None:
            return "loading"
        states = {r.replica.state for r in self._reports}
        if "ready" in states:
            return "ready"
        if states == {"failed"}:
            return "failed"
        return "loading"  # replicas (re)starting: none has reported

    @property
    def backend(self) -> RemoteBackend:
        """The model as a replica reported it.

        :raises RuntimeClosedError: until a replica has answered.
        """
        if self._facts is None:
            raise RuntimeClosedError("no Engine replica has answered yet")
        return RemoteBackend(self._facts, self._engine)

    def loaded_backend(self, model: str | None) -> RemoteBackend | None:
        """The replicas' model once one has answered (``model`` routes only to it), else None."""
        return None if self._facts is None else self.backend

    def loaded_models(self) -> list[LoadedModel]:
        """None listed apart from the default model: /api/ps lists that one with its replicas."""
        return []

    async def load(self, model: str, keep_alive: KeepAlive = None) -> None:
        """The replicas' model is loaded while they run: nothing to do."""

    async def unload(self, model: str) -> bool:
        """The replicas' model stays loaded while they run (Serve scales them): False."""
        return False

    def replicas(self) -> list[ReplicaStatus]:
        """Every replica that reported lately, by id."""
        return [r.replica for r in self._reports]

    def reports(self) -> list[ReplicaReport]:
        """The replicas' last reports, by id."""
        return list(self._reports)

    def capacity(self) -> int:
        """Requests the ready replicas hold at most: slots plus mailbox, summed."""
        return sum(
            r.status.slots_effective + r.status.queue_capacity
            for r in self._reports
            if r.status.state == "ready"
        )

    def status(self) -> RuntimeStatus:
        """The replicas' statuses summed (counts), with the application's state."""
        reports = self._reports
        if not reports:
            return _empty_status(self.config, self.state)
        first = reports[0].status
        sums = {k: sum(getattr(r.status, k) for r in reports) for k in _SUMMED}
        failures = [r.status.failure for r in reports if r.status.failure]
        failure = "; ".join(failures) if self.state == "failed" else None
        return msgspec.structs.replace(first, state=self.state, failure=failure, **sums)

    # -- requests ----------------------------------------------------------------------------

    def generate(
        self,
        request: GenerateRequest | ChatRequest,
        *,
        model: str | None = None,
        keep_alive: KeepAlive = None,
    ) -> RemoteStream:
        """Admit ``request`` here and return its stream (sent to a replica on the first read);
        ``model`` routes only to the replicas' model, and ``keep_alive`` has no effect (it stays
        loaded while they run).

        :raises QueueFullError: if this Ingress's requests in flight fill every ready replica.
        :raises RuntimeClosedError: if no replica is ready.
        """
        self._admit(1)
        return RemoteStream(self, request)

    def _admit(self, n: int) -> None:
        """Count ``n`` requests in flight here, or refuse them all.

        :raises QueueFullError: if they would overfill every ready replica.
        :raises RuntimeClosedError: if no replica is ready.
        """
        if self.state != "ready":
            raise RuntimeClosedError(f"the application is {self.state}; no replica takes requests")
        capacity = self.capacity()
        if self._in_flight + n > capacity:
            error = QueueFullError(capacity)
            error.args = (
                f"every replica's slots and mailbox are full ({self._in_flight} requests in flight; "
                f"{len(self._reports)} replicas hold {capacity})",
            )
            raise error
        self._in_flight += n

    def release(self) -> None:
        """A request admitted by :meth:`generate` has ended (its stream closed)."""
        self._in_flight -= 1

    def stream_call(self, request: GenerateRequest | ChatRequest) -> DeploymentResponseGenerator[Any]:
        """Send ``request`` to a replica Serve's router picks; its stream of batches."""
        call: DeploymentResponseGenerator[Any] = self._stream_engine.generate.remote(request)  # type: ignore[assignment]  # stream=True
        return call

    def generate_choices(
        self, request: GenerateRequest | ChatRequest, n: int, *, model: str | None = None
    ) -> ChoiceStream:
        """Admit ``n`` choices of ``request`` here, all or none, each its own call: Serve may
        route them to different replicas, and each evaluates the prompt (over Ray the choices
        do not share one prompt evaluation). With a ``seed``, choice i samples with ``seed + i``.

        :raises InvalidRequestError: if ``n`` is below 1, above 128 or above the ready
            replicas' slots (each choice takes one).
        :raises QueueFullError: if the requests in flight leave no room for all ``n``.
        :raises RuntimeClosedError: if no replica is ready.
        """
        slots = sum(r.status.slots_effective for r in self._reports if r.status.state == "ready")
        if not 1 <= n <= min(MAX_CHOICES, max(slots, 1)):
            raise InvalidRequestError(
                f"n is {n}; it must be 1 to {min(MAX_CHOICES, max(slots, 1))}: each choice takes a slot, "
                f"and the replicas have {slots}"
            )
        self._admit(n)
        streams = []
        for i in range(n):
            choice = request
            if i and request.seed is not None:
                choice = msgspec.structs.replace(request, seed=(request.seed + i) & SEED_LIMIT)
            streams.append(RemoteStream(self, choice, index=i))
        return ChoiceStream(streams)

    async def embed(
        self, inputs: EmbedRequest, *, model: str | None = None, keep_alive: KeepAlive = None
    ) -> Embeddings:
        """Embed on a replica (of the one model); one that goes away is replaced by another.

        :raises: what Runtime.embed raises; QueueFullError on Serve's back-pressure;
            ReplicaLostError if no replica answers after ``retries`` tries.
        """
        for attempt in range(self.retries + 1):
            try:
                result = await self._engine.embed.remote(inputs)
            except BackPressureError as exc:
                raise backpressure_error(exc) from None
            except LOST as exc:
                if attempt == self.retries:
                    raise ReplicaLostError(f"no replica answered after {attempt + 1} tries: {exc}") from None
                await anyio.sleep(RETRY_BACKOFF_S * (attempt + 1))
                continue
            except RayTaskError as exc:
                raise GenerationError(f"the replica failed: {exc}") from None
            if isinstance(result, WireError):
                raise error_from_wire(result)
            assert isinstance(result, Embeddings)
            return result
        raise AssertionError("unreachable")


class RemoteBackend:
    """The model's facts as an Engine replica reported them (a ServedBackend)."""

    def __init__(self, facts: EngineFacts, engine: DeploymentHandle[Any]) -> None:
        self._facts = facts
        self._engine = engine

    @property
    def info(self) -> ModelInfo:
        return self._facts.info

    @property
    def pieces(self) -> Sequence[bytes]:
        return self._facts.pieces

    @property
    def chat_template(self) -> object | None:
        """A stand-in when the replicas' model has a chat template (it renders there), else None."""
        return TEMPLATE_ON_REPLICAS if self._facts.chat_template else None

    def metadata(self, *, max_array_items: int | None = None) -> dict[str, MetadataValue]:
        """The metadata (blocking: the app calls it in a worker thread; arrays cut to
        ``max_array_items`` come from the start-up copy, whole ones from a replica)."""
        if max_array_items == SHOWN_ARRAY_ITEMS:
            return self._facts.metadata
        facts: EngineFacts = self._engine.facts.remote(max_array_items).result()
        return facts.metadata


def _empty_status(config: RuntimeConfig, state: RuntimeState) -> RuntimeStatus:
    """The status before any replica has reported."""
    return RuntimeStatus(
        state=state, failure=None, model=config.model, backend=config.backend, weights_bytes=0,
        kv_bytes_per_slot=0, n_ctx_per_slot=config.n_ctx_per_slot, slots_configured=0,
        slots_auto=config.slots == "auto", slots_effective=0, slots_target=0, slots_busy=0, queue_depth=0,
        queue_capacity=0, requests_admitted=0, requests_in_flight=0, requests_completed=0,
        requests_cancelled=0, requests_failed=0, requests_rejected=0, restarts=0, steps=0,
        kv_cache_type="", resizes=0, last_resize=None, memory=None,
    )  # fmt: skip
