"""The ModelActor's worker thread: blocking backend calls, one at a time, in order.

``anyio.to_thread.run_sync`` costs about 90 us a call here (a capacity limiter, a cancel scope
and a thread pool around each call); a step of a small batch on a GPU takes 1 to 2 ms, so that
is 5 to 10% of it. One dedicated thread fed by a queue, which answers through the event loop's
``call_soon_threadsafe``, costs about 30 us. A call is queued by :meth:`WorkerThread.submit`
and awaited by :meth:`WorkerThread.result`, so that the step loop can do other work while the
thread decodes. A call is never abandoned: when the waiting task is cancelled, it still waits
for the call to end (the context must not be touched by another thread meanwhile), then the
cancellation goes on. The runtime runs on asyncio event loops (uvloop included).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

__all__ = ["WorkerThread", "call_into", "settle"]

T = TypeVar("T")
_Settle = Callable[["asyncio.Future[Any]", Any, "BaseException | None"], None]
_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]", asyncio.AbstractEventLoop, _Settle]


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the event loop: hand a call's outcome to its future (nothing if it was cancelled)."""
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def call_into(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    future: asyncio.Future[Any],
    loop: asyncio.AbstractEventLoop,
    settled: _Settle = settle,
) -> None:
    """On any thread: run ``fn(*args)`` and hand what it returned or raised to ``future`` on
    ``loop`` (through ``settled``); a closed loop means nobody waits any more."""
    try:
        result, error = fn(*args), None
    except BaseException as exc:  # handed to the waiting task, which re-raises it
        result, error = None, exc
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settled, future, result, error)


def _serve(calls: queue.SimpleQueue[_Call | None]) -> None:
    while (call := calls.get()) is not None:
        call_into(*call)
        del call  # the thread keeps no reference to a finished call


class WorkerThread:
    """A daemon thread started on first use and ended when this object is collected.

    :param name: the thread's name (seen in profilers and tracebacks).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.busy = 0
        """Calls queued or running now."""

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` after the calls before it; await the future with :meth:`result`.

        :raises RuntimeError: if no asyncio event loop runs in this thread.
        """
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=_serve, args=(self._calls,), name=self._name, daemon=True)
            self._thread.start()
            weakref.finalize(self, self._calls.put, None)  # the thread ends once nothing can call it
        future: asyncio.Future[T] = loop.create_future()
        self.busy += 1
        self._calls.put((fn, args, future, loop, self._settle))
        return future

    def _settle(self, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        """On the event loop: the call ended."""
        self.busy -= 1
        settle(future, result, error)

    @staticmethod
    async def result(future: asyncio.Future[T], interrupt: Callable[[], None] | None = None) -> T:
        """What the submitted call returned.

        :param interrupt: called when the waiting task is cancelled, to make a long call end.
        :raises BaseException: what the call raised; or the waiting task's cancellation, once
            the call has returned.
        """
        try:
            return await asyncio.shield(future)
        except BaseException:
            if interrupt is not None:
                interrupt()
            if not future.done():
                with anyio.CancelScope(shield=True):
                    await asyncio.wait((future,))
            if not future.cancelled():
                future.exception()  # seen: the cancellation is what goes on
            raise

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread after the calls before it; return what it returns.

        :raises BaseException: as :meth:`result`.
        """
        return await self.result(self.submit(fn, *args))
