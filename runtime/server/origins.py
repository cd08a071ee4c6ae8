"""Which web pages may drive the server: an origin policy the way Ollama has it, and a Host
check against DNS rebinding.

- A request with an ``Origin`` header (browsers send one on every cross-origin POST, text/plain
  and form posts included) is refused with 403 unless the origin is allowed: by default
  localhost, 127.0.0.1 and 0.0.0.0 on any port (http and https) and the app://, file://,
  tauri://, vscode-webview:// and vscode-file:// schemes (Ollama's defaults), plus the patterns
  of the ``origins`` setting (``SLOTSERVE_ORIGINS``, comma-separated, ``*`` a wildcard).
  Allowed origins get CORS headers and preflight answers (Starlette's CORSMiddleware).
- When the server is bound to a loopback address, a ``Host`` that is not a loopback name or
  address (or this machine's own name) is refused with 403: a page on ``evil.example`` whose
  name was rebound to 127.0.0.1 still sends ``Host: evil.example``.
- Requests without an Origin (curl, SDKs, other servers) pass whatever their Content-Type.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.core.errors import preview

__all__ = ["DEFAULT_ORIGINS", "OriginPolicy", "binds_loopback", "is_loopback_name", "origin_pattern"]

DEFAULT_ORIGINS = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)  # fmt: skip
"""Origins allowed without a setting (Ollama's list)."""


def origin_pattern(patterns: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive regex matching any of ``patterns`` (``*`` matches anything)."""
    parts = [fnmatch.translate(p.strip().rstrip("/")) for p in patterns if p.strip()]
    return re.compile(
        "(?i)" + ("|".join(f"(?:{p})" for p in parts) or "(?!)")
    )  # the flag travels in the text


def binds_loopback(bind_host: str) -> bool:
    """Whether binding ``bind_host`` listens on loopback only (not 0.0.0.0, not an interface)."""
    try:
        return ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        return bind_host == "localhost"


def is_loopback_name(host: str) -> bool:
    """Whether a Host header's ``host`` (no port) names this machine: a loopback name or
    address, the unspecified address, or this machine's own name."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == socket.gethostname().lower()
    return address.is_loopback or address.is_unspecified


def _host_name(value: str) -> str:
    """The name or address of a Host header, without its port."""
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class OriginPolicy:
    """ASGI middleware: the Host check, then the Origin check, then CORS for allowed origins.

    :param extra_origins: patterns allowed besides DEFAULT_ORIGINS.
    :param check_host: refuse non-loopback Host headers (the server is bound to loopback).
    :param refusal: the body and content type of a 403 for a path (each API's error shape).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        extra_origins: Iterable[str],
        check_host: bool,
        refusal: Callable[[str, str], bytes],
    ) -> None:
        self._allowed = origin_pattern([*DEFAULT_ORIGINS, *extra_origins])
        self._check_host = check_host
        self._refusal = refusal
        self._cors = CORSMiddleware(
            app,
            allow_origin_regex=self._allowed.pattern,
            allow_methods=["*"],  # a method a route lacks is its 405, in the API's shape
            allow_headers=["*"],
            max_age=600,
        )
        self._app = app

    def allowed(self, origin: str) -> bool:
        """Whether a page of ``origin`` may call the server."""
        return self._allowed.fullmatch(origin.rstrip("/")) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        host, origins = "", []
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origins.append(value.decode("latin-1"))
        if self._check_host and host and not is_loopback_name(_host_name(host)):
            await self._refuse(
                scope, send, f"host {preview(host)} is not this machine's loopback name; refused"
            )
            return
        if not origins:
            await self._app(scope, receive, send)
            return
        for origin in origins:  # each one: two Origin headers must not smuggle one past
            if not self.allowed(origin):
                why = f"origin {preview(origin)} is not allowed; add it to the origins setting (SLOTSERVE_ORIGINS)"
                await self._refuse(scope, send, why)
                return
        await self._cors(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, message: str) -> None:
        body = self._refusal(scope["path"], message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})
