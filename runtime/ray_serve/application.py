"""The Serve application: Board, Engine (one Runtime per replica) and Ingress, bound together.

::

    app = build_app(EngineOptions(config=RuntimeConfig(slots=4)), replicas=2)
    serve.run(app, name="slotserve", route_prefix="/")

``app_builder`` is the same for ``serve run`` and a Serve config file (its ``args`` are
:class:`AppArgs`' fields); see the README's "Scale-out on Ray Serve".
"""

from __future__ import annotations

from typing import Any

import msgspec
import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Deployment

from runtime.core.config import RuntimeConfig
from runtime.ray_serve.engine import Board, Engine
from runtime.ray_serve.ingress import Ingress
from runtime.ray_serve.router import FreeSlotsRouter
from runtime.ray_serve.wire import EngineOptions, replica_capacity
from runtime.server.settings import ServerSettings

__all__ = ["AppArgs", "app_builder", "build_app", "gpus_per_replica"]

INGRESS_MAX_ONGOING = 4096
"""Requests one Ingress replica takes at once (HTTP connections; admission is ours)."""


class AppArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``args`` of ``serve run runtime.ray_serve:app_builder`` (a Serve config's ``args``)."""

    config: dict[str, Any] = msgspec.field(default_factory=dict)
    """RuntimeConfig fields (``model``, ``slots``, ``max_queue``, ...); the rest default."""
    server: dict[str, Any] = msgspec.field(default_factory=dict)
    """ServerSettings fields (``retry_after_s``, ``model_name``, ...)."""
    replicas: int = 1
    """Engine replicas (one per GPU)."""
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None
    """None: 1 where the layers go to a GPU and the cluster has GPUs, else 0."""
    ingress_replicas: int = 1
    graceful_shutdown_timeout_s: float = 120.0
    """How long a replica being stopped waits for its requests (the longest answer plus the
    mailbox's wait), then is killed."""
    fake_step_delay_s: float = 0.0


def gpus_per_replica(config: RuntimeConfig) -> float:
    """1 where the model's layers go to a GPU (llama.cpp, ``n_gpu_layers`` not 0) and the Ray
    cluster has GPUs; else 0."""
    if config.backend == "fake" or config.n_gpu_layers == 0:
        return 0.0
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0  # type: ignore[no-untyped-call]
    return 1.0 if gpus > 0 else 0.0


def build_app(
    options: EngineOptions,
    *,
    replicas: int = 1,
    settings: ServerSettings | None = None,
    cpus_per_replica: float = 1.0,
    gpus: float | None = None,
    ingress_replicas: int = 1,
    graceful_shutdown_timeout_s: float = 120.0,
    health_check_period_s: float = 10.0,
    version: str | None = None,
) -> Application:
    """The Serve application of ``replicas`` Engine replicas behind one Ingress deployment.

    Each Engine replica takes at most its most slots plus its mailbox at once
    (``max_ongoing_requests``). Serve's caller queue (``max_queued_requests``), where a request
    waits for the router to place it, holds as many as all the replicas: the Ingress admits no
    more than they hold, and a burst it admitted waits there for the router rather than being
    refused (with one replica's worth, a burst of 10 over 2 replicas of 6 was seen to lose 2 to
    BackPressureError). Past it a caller gets BackPressureError (a 503).

    :param gpus: GPUs per Engine replica (None: :func:`gpus_per_replica`).
    :param cpus_per_replica: logical CPUs each Engine replica reserves (the Ingress and the
        Board reserve a tenth of that).
    :param version: the deployments' version. Run again with the same version and another
        ``replicas``, the application scales without restarting the replicas it keeps (as a
        Serve config file does); None (Serve's way for the Python API): each ``serve.run``
        replaces every replica, gracefully. Serve marks this option internal
        (``Deployment.options(version=..., _internal=True)``); ray is pinned to 2.60.
    """
    config = options.config
    capacity = replica_capacity(config)
    small_cpus = max(0.01, cpus_per_replica / 10)
    board: Deployment = serve.deployment(
        name="Board", num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": small_cpus}
    )(Board)
    router = RequestRouterConfig(request_router_class=FreeSlotsRouter, request_routing_stats_period_s=1.0)  # type: ignore[arg-type]  # pydantic
    engine: Deployment = serve.deployment(
        name="Engine",
        num_replicas=replicas,
        max_ongoing_requests=capacity,
        max_queued_requests=capacity * replicas,
        ray_actor_options={
            "num_cpus": cpus_per_replica,
            "num_gpus": gpus_per_replica(config) if gpus is None else gpus,
        },
        health_check_period_s=health_check_period_s,
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        request_router_config=router,
    )(Engine)
    ingress: Deployment = serve.deployment(
        name="Ingress",
        num_replicas=ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": small_cpus},
    )(serve.ingress()(Ingress))
    if version is not None:
        board, engine, ingress = (
            d.options(version=version, _internal=True) for d in (board, engine, ingress)
        )
    bound_board = board.bind(options.report_period_s)
    app: Application = ingress.bind(
        engine.bind(options, bound_board), bound_board, config, settings or ServerSettings(host="0.0.0.0")
    )
    return app


def app_builder(args: dict[str, Any]) -> Application:
    """``serve run runtime.ray_serve:app_builder key=value ...`` and Serve config files.

    :raises msgspec.ValidationError: if ``args`` has an unknown key or a value of the wrong type.
    :raises ConfigError: if a RuntimeConfig or ServerSettings value is out of range.
    """
    parsed = msgspec.convert(args, AppArgs, strict=False)
    config = msgspec.convert(parsed.config, RuntimeConfig, strict=False)
    settings = msgspec.convert({"host": "0.0.0.0", **parsed.server}, ServerSettings, strict=False)
    options = EngineOptions(config=config, fake_step_delay_s=parsed.fake_step_delay_s)
    return build_app(
        options,
        replicas=parsed.replicas,
        settings=settings,
        cpus_per_replica=parsed.cpus_per_replica,
        gpus=parsed.gpus_per_replica,
        ingress_replicas=parsed.ingress_replicas,
        graceful_shutdown_timeout_s=parsed.graceful_shutdown_timeout_s,
    )
