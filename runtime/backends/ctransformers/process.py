"""The ctransformers worker process seen from the parent: start it, call it, notice its death.

Requests go over a socket pair as pickled tuples (multiprocessing.connection), one at a time;
the caller serialises them. The worker's stdout and stderr (where a failed native assertion
prints ``GGML_ASSERT: ...`` before the process aborts) are read by a thread that logs each
line at DEBUG and keeps the last few, so that the error for a dead worker can quote them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO

__all__ = ["WorkerDiedError", "WorkerProcess"]

log = logging.getLogger("slotserve.ctransformers.worker")
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
_TAIL_LINES = 12


class WorkerDiedError(RuntimeError):
    """The worker process ended (a native crash, a kill) or stopped answering mid-request."""


class WorkerProcess:
    """One running ``python -m runtime.backends.ctransformers.worker``; not thread-safe (callers lock)."""

    def __init__(self) -> None:
        parent, child = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.backends.ctransformers.worker", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, [_PROJECT_ROOT, os.environ.get("PYTHONPATH")])
                    ),
                },
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        assert self._proc.stdout is not None
        self._reader = threading.Thread(
            target=self._read_output,
            args=(self._proc.stdout,),
            name=f"ct-worker-{self.pid}-output",
            daemon=True,
        )
        self._reader.start()
        self.died: str | None = None
        """Why the process ended, once it has (the message of the WorkerDiedError raised)."""

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the process runs and has not failed a request."""
        return self.died is None and self._proc.poll() is None

    def _read_output(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    self._tail.append(line)
                    log.debug("[%d] %s", self.pid, line)

    def call(self, request: tuple[object, ...], timeout_s: float) -> object:
        """Send ``request`` and return the worker's answer.

        :raises WorkerDiedError: if the process is dead, dies while answering, or does not
            answer within ``timeout_s`` seconds (then it is killed).
        :raises RuntimeError: if the worker answers with an error (the process lives on).
        """
        if not self.alive:
            raise WorkerDiedError(self.died or self._death_message(f"before {request[0]!r}"))
        try:
            self._conn.send(request)
            reply = self._conn.recv() if self._conn.poll(timeout_s) else None
        except (EOFError, OSError):
            raise WorkerDiedError(self._death_message(f"during {request[0]!r}")) from None
        if reply is None:
            self._proc.kill()
            raise WorkerDiedError(
                self._death_message(f"after {timeout_s:g} s without an answer to {request[0]!r}")
            )
        status, value = reply
        if status == "error":
            raise RuntimeError(f"the ctransformers worker failed {request[0]!r}: {value}")
        return value

    def _death_message(self, when: str) -> str:
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._reader.join(timeout=2)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        said = " | ".join(self._tail) or "nothing"
        self.died = (
            f"the ctransformers worker process (pid {self.pid}) ended with {how} {when}; it printed: {said}"
        )
        return self.died

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to free its instances and exit; kill it if it does not in time."""
        if self._proc.poll() is None and self.died is None:
            with contextlib.suppress(OSError):
                self._conn.send(("close",))
        deadline = time.monotonic() + timeout_s
        try:
            self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()
        self._reader.join(timeout=2)
        if self.died is None:
            self.died = f"the ctransformers worker process (pid {self.pid}) was stopped"
