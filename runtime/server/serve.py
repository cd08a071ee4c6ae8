"""Running the app with uvicorn: until a signal (``slotserve serve``), or for a block of code.

::

    async with serving(create_app(config), port=0) as base_url:   # a free loopback port
        ...                                                      # talk to base_url

uvicorn's own signal capture is off: ``serve`` stops gracefully on SIGINT or SIGTERM (a second
one forces the exit) and returns normally; ``serving`` leaves signals to its host program.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import uvicorn
from starlette.types import ASGIApp

from runtime.core.config import RuntimeConfig
from runtime.server.app import create_app
from runtime.server.settings import ServerSettings

__all__ = ["serve", "serving"]


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers (they re-raise the signal on exit)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: ASGIApp, log_level: str, access_log: bool) -> _Server:
    config = uvicorn.Config(
        app, lifespan="on", ws="none", http="h11", log_level=log_level, access_log=access_log,
        timeout_graceful_shutdown=5,
    )  # fmt: skip
    return _Server(config)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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


async def _stop_on_signals(server: uvicorn.Server) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logging.getLogger("uvicorn.error").info("%s: shutting down", signal.Signals(signum).name)
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True


async def serve(config: RuntimeConfig, settings: ServerSettings, *, log_level: str = "info") -> None:
    """Serve ``config``'s model on ``settings.host``:``settings.port`` until SIGINT or SIGTERM.

    :raises OSError: if the address cannot be bound (in use, or not an address of this host).
    """
    sock = _bind(settings.host, settings.port)
    server = _server(create_app(config, settings), log_level, access_log=True)
    announce = logging.getLogger("uvicorn.error")  # configured by uvicorn.Config at log_level
    announce.info("slotserve serving on http://%s:%d", settings.host, sock.getsockname()[1])
    if not _loopback(settings.host):
        announce.warning("bound to %s: anyone who reaches this host may use the model", settings.host)
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signals, server)
            await server.serve(sockets=[sock])
            tg.cancel_scope.cancel()


@asynccontextmanager
async def serving(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn in a background task for the block; yields its base URL.

    ``port=0`` takes a free port. Leaving the block shuts the server down (its lifespan too).

    :raises OSError: if the address cannot be bound.
    :raises RuntimeError: if the server did not start.
    """
    sock = _bind(host, port)
    server = _server(app, log_level, access_log=False)
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
