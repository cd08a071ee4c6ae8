"""ServerSettings: how the HTTP server listens and what it accepts (the model is RuntimeConfig's).

Sources, later ones winning: the defaults below, a TOML file (these keys of it; the same file
may hold RuntimeConfig's), environment variables named ``SLOTSERVE_<FIELD>`` (upper case),
keyword arguments, as for RuntimeConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from runtime.core.config import load_settings, read_toml
from runtime.core.errors import ConfigError

__all__ = ["ServerSettings"]


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where to listen, how big a request body may be, and the name the model is served under.

    :raises ConfigError: if a value is out of range (the message names the field and limit).
    """

    host: str = "127.0.0.1"
    """Address to bind; loopback only unless told otherwise."""
    port: int = 11434
    """TCP port; 11434 is Ollama's, so Ollama clients find the server without settings."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (bytes); a bigger one gets 413."""
    retry_after_s: int = 1
    """Seconds a refused client is told to wait (``Retry-After`` on 503)."""
    model_name: str | None = None
    """The name the model is served under; default: the GGUF file's name without ``.gguf``."""
    drain_timeout_s: float = 30.0
    """On SIGTERM or SIGINT: seconds the running requests get to finish before they are ended
    with an in-band error (new and queued ones get 503 at once). 30 s is Kubernetes' default
    grace period; Ollama and vLLM end running requests at once."""
    header_timeout_s: float = 10.0
    """Seconds a connection may take to send a request's headers before it is closed."""
    body_timeout_s: float = 30.0
    """Seconds a request body may take to arrive once its headers are in; then 408."""
    idle_timeout_s: float = 5.0
    """Seconds an idle keep-alive connection is kept open (uvicorn's keep-alive timeout)."""
    max_connections: int = 1000
    """Open connections at most; more are answered 503 and closed. Lowered to the process's
    open-file limit less 64 when that is smaller."""
    max_client_priority: int = 1000
    """Highest priority an HTTP caller may ask for (``X-Slotserve-Priority``); a higher one gets
    400. 0 keeps callers from going ahead of the default class (they may still go behind it)."""
    origins: str = ""
    """Web origins allowed besides localhost's (comma-separated patterns, ``*`` a wildcard:
    ``https://app.example.com,chrome-extension://*``); see runtime.server.origins."""

    def __post_init__(self) -> None:
        limits = {
            "port": (0, 65_535), "max_body_bytes": (1, 1 << 30), "retry_after_s": (0, 3600),
            "drain_timeout_s": (0, 86_400), "header_timeout_s": (0.1, 3600), "body_timeout_s": (0.1, 3600), "idle_timeout_s": (1, 3600),
            "max_connections": (1, 1 << 20), "max_client_priority": (-1000, 1000),
        }  # fmt: skip
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"{name} is {value}; it must be between {low:,} and {high:,}")
        if not self.host:
            raise ConfigError("host is empty; give an address to bind, such as 127.0.0.1")
        if self.model_name is not None and not self.model_name.strip():
            raise ConfigError("model_name is empty; leave it unset or give a name")

    @classmethod
    def load(cls, toml_path: str | Path | None = None, **overrides: Any) -> ServerSettings:
        """Read defaults < ``toml_path`` (its keys that are ServerSettings fields) <
        ``SLOTSERVE_*`` environment < ``overrides`` (None values are skipped).

        :raises ConfigError: if the file cannot be read, or a value is malformed or out of range.
        """
        table = {k: v for k, v in read_toml(toml_path).items() if k in cls.__struct_fields__}
        return load_settings(cls, table, overrides)
