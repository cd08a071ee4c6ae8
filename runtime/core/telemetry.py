"""Memory readings behind one small protocol: NVML for the GPU, psutil and cgroup v2 for the
host, and a scripted source for tests.

A reading carries its source and time. A probe that fails logs once and reads as unknown
(None), never as zero free memory: an unknown reading never shrinks the slot count.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import psutil

from runtime.core.records import MemoryReading

__all__ = ["CgroupHostProbe", "MemoryProbe", "NvmlProbe", "ScriptedProbe"]

log = logging.getLogger("slotserve.telemetry")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


class MemoryProbe(Protocol):
    """Reads the memory that bounds the slot count."""

    def read(self) -> MemoryReading | None:
        """The memory now, or None when it cannot be read (unknown, not zero)."""


class _WarnOnce:
    def __init__(self) -> None:
        self._warned = False

    def failed(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s cannot be read (%r); treating it as unknown", what, exc)


class CgroupHostProbe:
    """Host memory: psutil's available memory, bounded by the cgroup v2 limits of this process's
    own cgroup (its path from ``/proc/self/cgroup``) and of every cgroup above it
    (``memory.max`` - ``memory.current``, the tightest wins), so a container's limit and a limit
    set on a sub-cgroup outside a container are both respected."""

    def __init__(self, cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> None:
        self._root = cgroup_root
        self._self = self_cgroup
        self._warn = _WarnOnce()

    def _own_dirs(self) -> list[Path]:
        """This process's cgroup folder, then each one above it up to the root."""
        relative = ""
        try:
            for line in self._self.read_text().splitlines():
                if line.startswith("0::"):  # the cgroup v2 line
                    relative = line[3:].strip().strip("/")
        except OSError:
            pass
        parts = [p for p in relative.split("/") if p not in ("", ".", "..")]
        return [self._root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]

    def _cgroup(self) -> tuple[int, int] | None:
        """(limit, usage) in bytes of the tightest cgroup v2 limit, or None where none is set."""
        tightest: tuple[int, int] | None = None
        for folder in self._own_dirs():
            try:
                raw = (folder / "memory.max").read_text().strip()
                if raw == "max":
                    continue
                limit, usage = int(raw), int((folder / "memory.current").read_text())
            except (OSError, ValueError):
                continue
            if tightest is None or limit - usage < tightest[0] - tightest[1]:
                tightest = (limit, usage)
        return tightest

    def read(self) -> MemoryReading | None:
        try:
            vm = psutil.virtual_memory()
        except Exception as exc:
            self._warn.failed("host memory", exc)
            return None
        total, free, source = int(vm.total), int(vm.available), "host"
        cg = self._cgroup()
        if cg is not None and cg[0] - cg[1] < free:
            total, free, source = cg[0], max(0, cg[0] - cg[1]), "cgroup"
        return MemoryReading(
            source=source,  # type: ignore[arg-type]
            device="host",
            total_bytes=total,
            used_bytes=total - free,
            free_bytes=free,
            time_s=time.monotonic(),
        )


class NvmlProbe:
    """GPU memory of device ``index`` through NVML (nvidia-ml-py)."""

    def __init__(self, index: int = 0) -> None:
        self._index = index
        self._handle: object | None = None
        self._warn = _WarnOnce()

    def read(self) -> MemoryReading | None:
        try:
            import pynvml

            if self._handle is None:
                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(self._index)
            info = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as exc:
            self._warn.failed(f"GPU {self._index} memory (NVML)", exc)
            return None
        return MemoryReading(
            source="nvml",
            device=f"gpu{self._index}",
            total_bytes=int(info.total),
            used_bytes=int(info.used),
            free_bytes=int(info.free),
            time_s=time.monotonic(),
        )


class ScriptedProbe:
    """A probe whose readings a test sets; ``free_bytes=None`` reads as unknown."""

    def __init__(self, free_bytes: int | None, total_bytes: int = 64 << 30) -> None:
        self.free_bytes = free_bytes
        self.total_bytes = total_bytes
        self.reads = 0

    def read(self) -> MemoryReading | None:
        self.reads += 1
        if self.free_bytes is None:
            return None
        return MemoryReading(
            source="scripted",
            device="scripted",
            total_bytes=self.total_bytes,
            used_bytes=self.total_bytes - self.free_bytes,
            free_bytes=self.free_bytes,
            time_s=time.monotonic(),
        )
