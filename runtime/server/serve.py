"""Running the app with uvicorn: until a signal (``slotserve serve``), or for a block of code.

::

    async with serving(create_app(config), port=0) as base_url:   # a free loopback port
        ...                                                      # talk to base_url

uvicorn's own signal capture is off: ``serve`` stops gracefully on SIGINT or SIGTERM (a second
one forces the exit) and returns normally; ``serving`` leaves signals to its host program.

A graceful stop keeps the contract with every client (:func:`serve_app`): the runtime stops
admitting (503 with Retry-After, in the API's shape, for new and queued requests), running
requests get ``drain_timeout_s`` to finish, then end with an in-band error and their final
frame, and only then does uvicorn close the connections. Connections are bounded too: one that
has not sent its headers within ``header_timeout_s`` is closed, an idle keep-alive one after
``idle_timeout_s``, and past ``max_connections`` (at most the open-file limit less a reserve) a
new one is answered 503 and closed, so the server never runs out of file descriptors. What the
event loop logs over and over (``accept()`` failing) is logged once per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import h11
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from runtime.core.config import RuntimeConfig
from runtime.runtime import Runtime
from runtime.server.app import create_app
from runtime.server.origins import binds_loopback
from runtime.server.settings import ServerSettings

__all__ = ["FD_RESERVE", "serve", "serve_app", "serving"]

log = logging.getLogger("uvicorn.error")  # configured by uvicorn.Config at its log level
FD_RESERVE = 64
"""File descriptors kept for the model, the logs and the worker threads when capping connections."""
_REPEAT_INTERVAL_S = 10.0
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: 62\r\n\r\n"
    b'{"error": "too many connections; the server is at its limit"}\n'
)


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers (they re-raise the signal on exit)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for the request headers and a connection cap."""

    class BoundedH11(H11Protocol):
        _headers_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_TOO_MANY)
                transport.close()
                return
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
                self._headers_timer = None
            super().connection_lost(exc)

        def _watch_headers(self) -> None:
            """Arm the deadline while a request's headers are awaited (and data came, or none
            yet on a new connection); disarm it once they are in."""
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self.timeout_keep_alive_task is None and self._headers_timer is None:
                self._headers_timer = self.loop.call_later(header_timeout_s, self._headers_late)
            elif not waiting and self._headers_timer is not None:
                self._headers_timer.cancel()
                self._headers_timer = None

        def send_400_response(self, msg: str) -> None:
            """A malformed request (bad framing, two Content-Lengths, no Host): 400 in JSON."""
            body = msgspec.json.encode({"error": f"invalid HTTP request: {msg.rstrip('.')}"}) + b"\n"
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (
                h11.Response(status_code=400, headers=headers),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                with contextlib.suppress(h11.LocalProtocolError):
                    self.transport.write(self.conn.send(event))
            self.transport.close()

        def _headers_late(self) -> None:
            self._headers_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return BoundedH11


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to the open-file limit less FD_RESERVE (logged)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - FD_RESERVE >= max_connections:
        return max_connections
    cap = max(1, soft - FD_RESERVE)
    log.warning(
        "max_connections lowered from %d to %d: the open-file limit is %d", max_connections, cap, soft
    )
    return cap


def _server(app: ASGIApp, settings: ServerSettings, log_level: str, access_log: bool) -> _Server:
    config = uvicorn.Config(
        app, lifespan="on", ws="none", log_level=log_level, access_log=access_log,
        http=_protocol(settings.header_timeout_s, connection_cap(settings.max_connections)),
        timeout_keep_alive=max(1, round(settings.idle_timeout_s)), timeout_graceful_shutdown=5,
    )  # fmt: skip
    return _Server(config)


class _Repeats:
    """An event-loop exception handler that logs each kind of message once per interval (the
    accept loop fails thousands of times a second at the open-file limit)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        key = str(context.get("message", ""))
        now = time.monotonic()
        if now - self._last.get(key, -_REPEAT_INTERVAL_S) < _REPEAT_INTERVAL_S:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        exc = context.get("exception")
        more = f" ({dropped} more like it in the last {_REPEAT_INTERVAL_S:g} s)" if dropped else ""
        log.warning("%s: %r%s", key or "event loop error", exc, more)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve_app(
    app: Starlette,
    settings: ServerSettings,
    sock: socket.socket,
    stop: anyio.Event,
    *,
    force: anyio.Event | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``app`` on ``sock`` until ``stop`` is set, then stop gracefully (see the module
    docstring); ``force`` set cuts the drain short and closes at once."""
    server = _server(app, settings, log_level, access_log=log_level == "info")  # configures logging
    log.info("slotserve serving on http://%s:%d", settings.host, sock.getsockname()[1])
    if not binds_loopback(settings.host):
        log.warning("bound to %s: anyone who reaches this host may use the model", settings.host)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(_Repeats())

    async def stop_gracefully() -> None:
        await stop.wait()
        app.state.server.stop_reading()  # bodies still arriving: 503 now, not a cut connection later
        cut = await app.state.server.runtime.drain(settings.drain_timeout_s)
        log.info("drained: %d request(s) cut short; closing the connections", cut)
        server.should_exit = True

    async def stop_now(event: anyio.Event) -> None:
        await event.wait()
        server.force_exit = server.should_exit = True

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_gracefully)
            if force is not None:
                tg.start_soon(stop_now, force)
            await server.serve(sockets=[sock])
            tg.cancel_scope.cancel()
    finally:
        loop.set_exception_handler(previous)


async def _stop_on_signals(stop: anyio.Event, force: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: shutting down%s", signal.Signals(signum).name, " now" if stop.is_set() else "")
            (force if stop.is_set() else stop).set()


async def serve(
    config: RuntimeConfig | Runtime, settings: ServerSettings, *, log_level: str = "info"
) -> None:
    """Serve ``config``'s models (or a Runtime not yet entered: the server runs it) on
    ``settings.host``:``settings.port`` until SIGINT or SIGTERM.

    :raises OSError: if the address cannot be bound (in use, or not an address of this host).
    """
    sock = _bind(settings.host, settings.port)
    app = create_app(config, settings)
    stop, force = anyio.Event(), anyio.Event()
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signals, stop, force)
            await serve_app(app, settings, sock, stop, force=force, log_level=log_level)
            tg.cancel_scope.cancel()


@asynccontextmanager
async def serving(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log_level: str = "warning",
    settings: ServerSettings | None = None,
) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn in a background task for the block; yields its base URL.

    ``port=0`` takes a free port. Leaving the block shuts the server down (its lifespan too).
    ``settings`` gives the connection limits (default: ServerSettings' defaults).

    :raises OSError: if the address cannot be bound.
    :raises RuntimeError: if the server did not start.
    """
    sock = _bind(host, port)
    server = _server(app, settings or ServerSettings(), log_level, access_log=False)
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            while not server.started:
                if server.should_exit:
                    raise RuntimeError("the HTTP server did not start")
                await anyio.sleep(0.005)
            try:
                yield f"http://{url_host}:{bound}"
            finally:
                server.should_exit = True
