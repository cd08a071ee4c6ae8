"""The versions the server reports: slotserve's own, and the Ollama release whose API it follows.

GET /api/version answers ``{"version": OLLAMA_VERSION, "slotserve_version": ...}``: clients
read ``version`` as Ollama's and gate features on it (Open WebUI wants at least 0.1.16), so it
names the Ollama release this server's Ollama API is written against. slotserve's own version
is in ``slotserve_version`` there, in /health's ``version``, and in OpenAI's
``system_fingerprint``.
"""

from __future__ import annotations

import functools
from importlib import metadata

__all__ = ["OLLAMA_VERSION", "slotserve_version"]

OLLAMA_VERSION = "0.15.2"
"""The Ollama release (January 2026) whose API /api/version claims."""


@functools.cache  # reading the package metadata takes a file read: once, not per /health
def slotserve_version() -> str:
    """slotserve's version, from its installed package metadata ("0.0.0" when not installed)."""
    try:
        return metadata.version("slotserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"
