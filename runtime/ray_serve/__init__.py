"""slotserve on Ray Serve: replicas of the runtime, routed by free slots (the ``ray`` extra).

Every Ray import of slotserve is in this package; nothing else imports it.

- ``engine``: Engine, the deployment whose every replica owns one Runtime; Board, which
  gathers the replicas' figures and metrics.
- ``router``: FreeSlotsRouter, Serve's RequestRouter ranking replicas by free slots and mailbox
  depth (pickled into every caller: it imports no backend).
- ``remote``: RemoteRuntime, the replicas as one ServedRuntime for the HTTP app; ``stream``:
  RemoteStream, a request's chunks from a replica (sent again if it went away before the
  first); ``series``: the replicas' Prometheus series with a ``replica`` label.
- ``ingress``: Ingress, the deployment serving runtime.server's app over RemoteRuntime.
- ``application``: build_app and app_builder (``serve run``), ``launch``: ``slotserve serve --ray``.
- ``wire``: the records that cross between them (no Ray).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.core.lazy import lazy_exports

if TYPE_CHECKING:
    from runtime.ray_serve.application import AppArgs, app_builder, build_app
    from runtime.ray_serve.launch import serve_on_ray
    from runtime.ray_serve.wire import EngineOptions

_HOMES = {
    "AppArgs": "runtime.ray_serve.application",
    "EngineOptions": "runtime.ray_serve.wire",
    "app_builder": "runtime.ray_serve.application",
    "build_app": "runtime.ray_serve.application",
    "serve_on_ray": "runtime.ray_serve.launch",
}

__all__ = ["AppArgs", "EngineOptions", "app_builder", "build_app", "serve_on_ray"]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
