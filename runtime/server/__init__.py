"""slotserve's HTTP server: Ollama- and OpenAI-compatible endpoints over one Runtime.

Starlette routes, uvicorn serves. See app.py for the endpoints, reply.py for streaming,
cancellation on disconnect and in-band errors, errors.py for the status codes.
"""

from __future__ import annotations

from runtime.server.app import create_app
from runtime.server.serve import serve, serving
from runtime.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve", "serving"]
