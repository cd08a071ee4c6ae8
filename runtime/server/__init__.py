"""slotserve's HTTP server: Ollama- and OpenAI-compatible endpoints over one Runtime.

Starlette routes, uvicorn serves. See app.py for the endpoints, reply.py for streaming,
cancellation on disconnect and in-band errors, errors.py for the status codes. Names are handed
on lazily: ``runtime.server.settings`` alone does not load Starlette or uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.core.lazy import lazy_exports

if TYPE_CHECKING:
    from runtime.server.app import create_app
    from runtime.server.serve import serve, serving
    from runtime.server.settings import ServerSettings

_HOMES = {
    "ServerSettings": "runtime.server.settings",
    "create_app": "runtime.server.app",
    "serve": "runtime.server.serve",
    "serving": "runtime.server.serve",
}

__all__ = ["ServerSettings", "create_app", "serve", "serving"]


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
