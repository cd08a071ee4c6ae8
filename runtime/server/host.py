"""RuntimeHost: the Runtime behind the app, and whether it can take requests now.

A Runtime that has not been entered yet is started by the host in a background task that owns
``async with runtime`` for the app's whole life, so the server answers (``/health`` says
``loading``) while the weights load. A Runtime that is already running (an app embedded in a
host application) is only served; its owner starts and stops it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc

from runtime.core.errors import RuntimeClosedError, RuntimeFailedError
from runtime.server.served import ServedRuntime

__all__ = ["RuntimeHost"]

log = logging.getLogger("slotserve.server")


class RuntimeHost:
    """Starts ``runtime`` in the background if it is not running yet, and reports readiness."""

    def __init__(self, runtime: ServedRuntime) -> None:
        self.runtime = runtime
        self.owned = runtime.status().state == "loading"
        """True when this host enters (loads) and leaves the runtime itself."""
        self.load_error: str | None = None
        """Why the runtime could not be started, if it could not."""

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """For the app's lifespan: start an owned runtime in the background; stop it on exit."""
        if not self.owned:
            yield
            return
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._own, stop)
            try:
                yield
            finally:
                stop.set()

    async def _own(self, stop: anyio.Event) -> None:
        try:
            async with self.runtime:
                await stop.wait()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("the runtime could not be started")

    def problem(self) -> str | None:
        """None when requests can be served now; otherwise why not (``loading``, ``failed: ...``)."""
        if self.load_error is not None:
            return f"failed: {self.load_error}"
        state = self.runtime.state  # not status(): this runs for every request
        if state == "ready":
            return None
        if state == "failed":
            return f"failed: {self.runtime.status().failure}"
        return state

    def check_ready(self) -> None:
        """Raise unless the runtime takes requests now.

        :raises RuntimeFailedError: if it failed to start or failed since.
        :raises RuntimeClosedError: if it is still loading, or is closed.
        """
        problem = self.problem()
        if problem is None:
            return
        if problem.startswith("failed"):
            raise RuntimeFailedError(f"the runtime {problem}")
        if problem == "loading":
            raise RuntimeClosedError("the model is still loading; try again shortly")
        raise RuntimeClosedError(f"the runtime is {problem}; it takes no requests")
