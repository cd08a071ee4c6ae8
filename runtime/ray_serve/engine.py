"""Engine: the Ray Serve deployment whose every replica owns one Runtime (its ModelActor, slots
and Supervisor), and the Board that gathers the replicas' figures.

A replica streams a request's chunks from an async generator, in batches (what arrived
together goes in one item); its errors travel as WireError items. A caller that cancels (the
client went away, the Ingress cancelled) cancels the generator, which closes the stream: the
slot frees at its next step. Serve's graceful shutdown waits for the replica's ongoing
requests (those in its mailbox too) before it calls ``__del__``, which then drains the runtime
and leaves the Board.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from runtime.backends.base import ModelInfo
from runtime.backends.gguf_metadata import MetadataValue
from runtime.core.errors import RuntimeClosedError, RuntimeFailedError
from runtime.core.messages import ChatRequest, Chunk, Embeddings, EmbedRequest, GenerateRequest
from runtime.ray_serve.wire import EngineOptions, ReplicaReport, RoutingStats, WireError, error_to_wire
from runtime.runtime import Runtime
from runtime.server.served import ReplicaStatus

__all__ = ["Board", "Engine", "EngineFacts"]

log = logging.getLogger("slotserve.ray")

_REPORT_TTL_PERIODS = 4
"""A replica that has not reported for this many periods is gone (died, or left)."""


class EngineFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the Ingress needs once about the model: its info, token pieces and metadata."""

    info: ModelInfo
    pieces: list[bytes]
    metadata: dict[str, MetadataValue]
    chat_template: bool = False
    """Whether the model has a chat template (it renders on the replicas)."""


class Engine:
    """One Runtime per replica (see the module docstring).

    :param options: the runtime's config and the fake backend's step delay.
    :param board: the Board deployment's handle (None: no reports, as in a bare test).
    :raises ModelLoadError: (from ``__init__``) if the model cannot be loaded; Serve then
        retries the replica and reports the deployment unhealthy.
    """

    async def __init__(self, options: EngineOptions, board: DeploymentHandle[Any] | None = None) -> None:  # type: ignore[misc]  # Serve awaits it
        self._options = options
        self._board = board
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._node = socket.gethostname()
        self._registry = CollectorRegistry()
        backend = None
        config = options.config
        if config.backend == "fake":
            from runtime.backends.fake import FakeBackend

            backend = FakeBackend(
                n_seq_max=config.initial_slots,
                n_ctx_per_slot=config.n_ctx_per_slot,
                step_delay_s=options.fake_step_delay_s,
                fault_prompts=options.fake_fault_prompts,
            )
        self._rt = Runtime(config, backend=backend, registry=self._registry)
        self._stop = asyncio.Event()
        started = asyncio.Event()
        self._task = asyncio.create_task(self._own(started))  # the Runtime's task group lives in one task
        await started.wait()
        if self._rt.state != "ready":
            await self._task  # raises why it did not start (ModelLoadError, ...): Serve retries the replica
            raise RuntimeFailedError(f"replica {self.replica_id}: the runtime did not start")
        self._reporter = asyncio.create_task(self._report_forever())
        log.info("replica %s ready (pid %d)", self.replica_id, os.getpid())

    async def _own(self, started: asyncio.Event) -> None:
        try:
            async with self._rt:
                started.set()
                await self._stop.wait()
        finally:
            started.set()

    # -- requests ----------------------------------------------------------------------------

    async def generate(
        self, request: GenerateRequest | ChatRequest
    ) -> AsyncIterator[list[Chunk] | WireError]:
        """Stream ``request``'s chunks, in batches; an error is the last item (a WireError)."""
        try:
            async with self._rt.generate(request) as stream:
                async for chunk in stream:
                    batch = [chunk, *stream.available()]
                    yield batch
                    if batch[-1].done:
                        return
        except Exception as exc:
            yield error_to_wire(exc)

    async def embed(self, request: EmbedRequest) -> Embeddings | WireError:
        """The embeddings of ``request`` (or why not, as a WireError)."""
        try:
            return await self._rt.embed(request)
        except Exception as exc:
            return error_to_wire(exc)

    async def facts(self, max_array_items: int | None) -> EngineFacts:
        """The model's info, pieces and metadata (arrays cut to ``max_array_items``; None: whole)."""
        backend = self._rt.backend
        metadata = await asyncio.to_thread(backend.metadata, max_array_items=max_array_items)
        return EngineFacts(info=backend.info, pieces=list(backend.pieces), metadata=metadata,
                           chat_template=backend.chat_template is not None)  # fmt: skip

    # -- Serve's hooks -----------------------------------------------------------------------

    def record_routing_stats(self) -> dict[str, Any]:
        """Free slots, mailbox depth and memory pressure, for FreeSlotsRouter."""
        stats: dict[str, Any] = msgspec.to_builtins(RoutingStats.of(self._rt.status()))
        return stats

    def check_health(self) -> None:
        """Serve's health check (every ``health_check_period_s``).

        :raises RuntimeFailedError: if the runtime failed (too many restarts) or closed.
        """
        state = self._rt.state
        if state == "failed":
            raise RuntimeFailedError(f"replica {self.replica_id}: {self._rt.status().failure}")
        if state in ("closed", "loading"):
            raise RuntimeClosedError(f"replica {self.replica_id}: the runtime is {state}")

    async def __del__(self) -> None:
        """Scale-down or redeploy: Serve waited for the ongoing requests; drain whatever is left,
        leave the Board, close the runtime."""
        self._reporter.cancel()
        with contextlib.suppress(Exception):
            cut = await self._rt.drain(timeout_s=5.0)
            if cut:
                log.warning("replica %s: %d request(s) cut short at shutdown", self.replica_id, cut)
        if self._board is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._board.leave.remote(self.replica_id), timeout=2.0)  # gone too?
        self._stop.set()
        with contextlib.suppress(Exception):
            await self._task

    # -- reports -----------------------------------------------------------------------------

    def report(self) -> ReplicaReport:
        """This replica's figures and metrics now."""
        status = self._rt.status()
        replica = ReplicaStatus(
            id=self.replica_id, state=status.state, node=self._node, slots=status.slots_effective,
            busy=status.slots_busy, queue=status.queue_depth, queue_capacity=status.queue_capacity,
            admitted=status.requests_admitted, failure=status.failure,
        )  # fmt: skip
        return ReplicaReport(
            replica=replica, status=status, metrics=generate_latest(self._registry), at_s=time.time()
        )

    async def _report_forever(self) -> None:
        if self._board is None:
            return
        period_s = self._options.report_period_s
        while True:
            try:
                await asyncio.wait_for(self._board.report.remote(self.report()), timeout=5 * period_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the Board restarting: the next report gets through
                log.debug("replica %s: report not taken (%s)", self.replica_id, exc)
            await asyncio.sleep(period_s)


class Board:
    """The replicas' last reports, for the Ingress's /health, /api/ps and /metrics; a replica
    silent for ``_REPORT_TTL_PERIODS`` periods is dropped."""

    def __init__(self, period_s: float = 1.0) -> None:
        self._period_s = period_s
        self._reports: dict[str, ReplicaReport] = {}

    def report(self, report: ReplicaReport) -> None:
        """Take a replica's report."""
        self._reports[report.replica.id] = report

    def leave(self, replica_id: str) -> None:
        """A replica is shutting down."""
        self._reports.pop(replica_id, None)

    def snapshot(self) -> list[ReplicaReport]:
        """Every live replica's last report, by replica id."""
        now = time.time()
        self._reports = {
            k: r for k, r in self._reports.items() if now - r.at_s < _REPORT_TTL_PERIODS * self._period_s
        }
        return [self._reports[k] for k in sorted(self._reports)]
