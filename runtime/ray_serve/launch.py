"""``slotserve serve --ray``: connect to (or start) a Ray cluster, run the application on Serve
with its HTTP proxy at the server's host and port, and shut it down on SIGINT or SIGTERM
(Serve drains each replica first: no admitted request is lost)."""

from __future__ import annotations

import logging
import os
import signal

import anyio
import ray
from ray import serve

from runtime.core.config import RuntimeConfig
from runtime.ray_serve.application import build_app
from runtime.ray_serve.wire import EngineOptions
from runtime.server.settings import ServerSettings

__all__ = ["APP_NAME", "serve_on_ray", "start_ray"]

log = logging.getLogger("slotserve.ray")

APP_NAME = "slotserve"


def start_ray(address: str | None, **init: object) -> None:
    """Connect to the cluster at ``address`` (``auto``: the one this node belongs to), or start
    a local one when None. Usage statistics stay off unless the environment turns them on."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, **init)  # type: ignore[arg-type]


async def serve_on_ray(
    config: RuntimeConfig,
    settings: ServerSettings,
    *,
    replicas: int = 1,
    address: str | None = None,
    cpus_per_replica: float = 1.0,
) -> None:
    """Serve ``config``'s model from ``replicas`` Engine replicas until a signal.

    :param address: the Ray cluster (``auto``, ``ray://host:10001``); None starts a local one.
    :param cpus_per_replica: logical CPUs each Engine replica reserves.
    :raises ConfigError: if a setting is out of range.
    """
    start_ray(address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_app(EngineOptions(config=config), replicas=replicas, settings=settings,
                    cpus_per_replica=cpus_per_replica)  # fmt: skip
    await anyio.to_thread.run_sync(lambda: serve.run(app, name=APP_NAME, route_prefix="/", blocking=False))
    log.warning(
        "serving on Ray Serve at http://%s:%d with %d Engine replica(s)",
        settings.host,
        settings.port,
        replicas,
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signals, stop)  # listens until the end: a second signal is not fatal
        await stop.wait()
        log.warning("stopping: Serve drains the replicas")
        await anyio.to_thread.run_sync(lambda: serve.delete(APP_NAME))
        serve.shutdown()  # type: ignore[no-untyped-call]
        if address is None:
            ray.shutdown()
        tg.cancel_scope.cancel()


async def _stop_on_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.warning("%s: shutting down", signal.Signals(signum).name)
            stop.set()
