"""Ingress: the Ray Serve deployment that serves slotserve's own HTTP app (both APIs, /health,
/metrics) over the Engine replicas, through a RemoteRuntime. Serve's proxy sends it every HTTP
request; it holds no model (CPU only)."""

from __future__ import annotations

from typing import Any

from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette

from runtime.core.config import RuntimeConfig
from runtime.ray_serve.remote import RemoteRuntime
from runtime.server.app import create_app
from runtime.server.settings import ServerSettings

__all__ = ["Ingress"]


class Ingress:
    """The HTTP app over ``engine``'s replicas, their figures read from ``board``.

    :param config: the replicas' RuntimeConfig.
    :param settings: the server's settings (body limit, Retry-After, model name).
    """

    async def __init__(  # type: ignore[misc]  # Serve awaits it
        self,
        engine: DeploymentHandle[Any],
        board: DeploymentHandle[Any],
        config: RuntimeConfig,
        settings: ServerSettings,
    ) -> None:
        self.remote = RemoteRuntime(engine, board, config)
        self._app = create_app(self.remote, settings)

    def __serve_build_asgi_app__(self) -> Starlette:
        """Serve's late-bound ASGI app: ours, its lifespan run by Serve."""
        return self._app
