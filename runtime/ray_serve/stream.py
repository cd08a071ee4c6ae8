"""RemoteStream: one request's chunks from an Engine replica, as the HTTP app reads a
ResponseStream; a replica lost before the first chunk is replaced by a new call, which Serve's
router sends to another replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from types import TracebackType
from typing import Any, Protocol, Self

import msgspec
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentResponseGenerator

from runtime.core.errors import (
    DeadlineUnmetError,
    QueueFullError,
    ReplicaLostError,
    RuntimeClosedError,
)
from runtime.core.messages import ChatRequest, Chunk, GenerateRequest
from runtime.ray_serve.wire import WireError, error_from_wire

__all__ = ["LOST", "RETRY_BACKOFF_S", "RemoteStream", "StreamSource", "backpressure_error"]

log = logging.getLogger("slotserve.ray")

RETRY_BACKOFF_S = 0.25
"""A request sent again waits this long times its tries so far (0.25, 0.5, 0.75 s: past the
routing figures' 1 s period, so the router has seen the replica go)."""
MOVED_WAIT_S = 30.0
"""A request given back before its first chunk (its replica drains, or went away) waits up to
this long for room on another replica (sent again every ROOM_POLL_S), where a full one would
refuse a new request: it was admitted already, and a scale-down must not turn it into a 503."""
ROOM_POLL_S = 0.5
"""How often a request given back is sent again while the other replicas are full."""
LOST = (RayActorError, RayServeException)
"""What a handle raises when the replica is gone (died, unreachable, or none left)."""


def backpressure_error(exc: BackPressureError) -> QueueFullError:
    """Serve's caller queue is full: our QueueFullError (a 503 with Retry-After)."""
    queued, limit = exc.args[0], exc.args[1]  # (num_queued_requests, max_queued_requests, ...)
    error = QueueFullError(limit)
    error.args = (f"every replica is busy and {queued} requests wait for one (max_queued_requests={limit})",)
    return error


class StreamSource(Protocol):
    """What a RemoteStream needs of its RemoteRuntime."""

    @property
    def retries(self) -> int: ...

    def stream_call(self, request: GenerateRequest | ChatRequest) -> DeploymentResponseGenerator[Any]: ...

    def release(self) -> None: ...


class RemoteStream:
    """One request's chunks from an Engine replica (a ChunkStream)."""

    def __init__(
        self, remote: StreamSource, request: GenerateRequest | ChatRequest, *, index: int = 0
    ) -> None:
        self._remote = remote
        self._request = request
        self._index = index
        """Which of its request's n choices this is (the replica numbers every stream's 0)."""
        self._call: DeploymentResponseGenerator[Any] | None = None
        self._ready: deque[Chunk] = deque()
        self._received = 0
        self._done = False
        self.tries = 0
        """Calls made for this request, less those a full replica refused after it was given
        back (1 unless a replica went away before its first chunk)."""
        self._moved_s: float | None = None  # when a replica first gave it back (monotonic)

    async def __aenter__(self) -> Self:
        return self

    @property
    def request(self) -> GenerateRequest | ChatRequest:
        """The request this stream answers."""
        return self._request

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def __aiter__(self) -> Self:
        return self

    async def aclose(self) -> None:
        """Stop reading; a request still running on its replica is cancelled there."""
        self._close()

    def _close(self) -> None:
        if self._done:
            return
        self._done = True
        self._remote.release()
        if self._call is not None:  # a no-op once the replica's generator has ended; Serve's cancel
            with contextlib.suppress(Exception):  # re-raises the call's own failure, answered already
                self._call.cancel()  # type: ignore[no-untyped-call]

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._remote.release()

    async def __anext__(self) -> Chunk:
        if not self._ready:
            if self._done:
                raise StopAsyncIteration
            try:
                self._ready.extend(await self._next_batch())
            except BaseException:
                self._close()
                raise
        chunk = self._ready.popleft()
        if chunk.done:
            self._close()
        return chunk

    async def _send_again(self) -> None:
        """After its replica gave it back (drains, failed or went away) before its first chunk:
        wait for the router to see that (the backoff), then send it anew."""
        self._call = None
        self._moved_s = self._moved_s or time.monotonic()
        await asyncio.sleep(RETRY_BACKOFF_S * self.tries)

    async def _wait_for_room(self, refusal: BackPressureError | QueueFullError) -> bool:
        """Whether to send again a request that a full replica refused with ``refusal`` (then
        after ROOM_POLL_S): only one given back by another replica, within MOVED_WAIT_S of
        that, and never for a missed deadline (waiting does not meet it)."""
        if (
            self._moved_s is None
            or self._received
            or isinstance(refusal, DeadlineUnmetError)
            or time.monotonic() - self._moved_s > MOVED_WAIT_S
        ):
            return False
        self._call = None
        self.tries -= 1  # a wait for room is not one of the retries
        await asyncio.sleep(ROOM_POLL_S)
        return True

    def available(self) -> list[Chunk]:
        """The chunks of the batch that came with the last read."""
        chunks = list(self._ready)
        self._ready.clear()
        if chunks and chunks[-1].done:
            self._close()
        return chunks

    async def _next_batch(self) -> list[Chunk]:
        """The next batch from the replica; before the first chunk a lost replica (or one that
        is draining) is replaced by a call that Serve routes anew.

        :raises ReplicaLostError: if the replica went away after the first chunk, or before it
            ``retries`` times over.
        :raises QueueFullError: on Serve's back-pressure.
        """
        while True:
            if self._call is None:
                self.tries += 1
                self._call = self._remote.stream_call(self._request)
            try:
                item = await self._call.__anext__()
            except StopAsyncIteration:
                raise ReplicaLostError("the replica's stream ended without a final chunk") from None
            except BackPressureError as exc:
                if await self._wait_for_room(exc):
                    continue
                raise backpressure_error(exc) from None
            except (*LOST, RayTaskError) as exc:
                if self._received or self.tries > self._remote.retries or isinstance(exc, RayTaskError):
                    raise ReplicaLostError(
                        f"the replica serving this request went away: {type(exc).__name__}"
                    ) from None
                log.warning(
                    "a replica went away before the first chunk (%s); sending the request again",
                    type(exc).__name__,
                )
                await self._send_again()
                continue
            if isinstance(item, WireError):
                error = error_from_wire(item)
                retry = isinstance(error, RuntimeClosedError)  # that replica drains, or failed
                if retry and not self._received and self.tries <= self._remote.retries:
                    await self._send_again()  # another replica takes it, once the router's figures say so
                    continue
                if isinstance(error, QueueFullError) and await self._wait_for_room(error):
                    continue
                raise error
            batch: list[Chunk] = item
            self._received += len(batch)
            if self._index:
                batch = [msgspec.structs.replace(chunk, index=self._index) for chunk in batch]
            return batch
