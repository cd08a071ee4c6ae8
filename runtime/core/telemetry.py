"""Memory readings behind one small protocol: psutil and cgroup v2 for the host, a scripted
source for tests (NVML for the GPUs is runtime.core.nvml), and what they share: combining
devices into one reading, and its text for the log.

A reading carries its source, time and devices. A probe that fails logs once and reads as
unknown (None), never as zero free memory: an unknown reading never shrinks the slot count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import psutil

from runtime.core.records import DeviceMemory, MemoryReading, MemorySource

__all__ = ["CgroupHostProbe", "MemoryProbe", "ScriptedProbe", "WarnOnce", "combine", "memory_text"]

log = logging.getLogger("slotserve.telemetry")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


class MemoryProbe(Protocol):
    """Reads the memory that bounds the slot count."""

    def read(self) -> MemoryReading | None:
        """The memory now, or None when it cannot be read (unknown, not zero)."""


class WarnOnce:
    """Logs the first failure of each thing a probe reads, not the ones after it."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def failed(self, what: str, exc: BaseException) -> None:
        """Log that ``what`` cannot be read, the first time it fails."""
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s cannot be read (%r); treating it as unknown", what, exc)


def _per_share(d: DeviceMemory) -> tuple[int, int, int] | None:
    """(free, total, used) bytes of ``d`` divided by its KV share; None if one is unknown."""
    if d.free_bytes is None or d.total_bytes is None or d.used_bytes is None or d.kv_share <= 0:
        return None
    return int(d.free_bytes / d.kv_share), int(d.total_bytes / d.kv_share), int(d.used_bytes / d.kv_share)


def combine(source: MemorySource, devices: Sequence[DeviceMemory]) -> MemoryReading:
    """One reading of ``devices`` (at least one), its sizes the bounding device's (see
    MemoryReading), or None where a device that holds KV is unknown."""
    holding = [(_per_share(d), d) for d in devices if d.kv_share > 0]
    known = [(figures, d) for figures, d in holding if figures is not None]
    now = time.monotonic()
    if not known or len(known) < len(holding):
        first = next((d for figures, d in holding if figures is None), devices[0])
        return MemoryReading(
            source=source, device=first.device, total_bytes=None, used_bytes=None, free_bytes=None,
            time_s=now, devices=tuple(devices),
        )  # fmt: skip
    (free, total, used), bound = min(known, key=lambda k: k[0][0])
    return MemoryReading(
        source=source, device=bound.device, total_bytes=total, used_bytes=used, free_bytes=free,
        time_s=now, devices=tuple(devices),
    )  # fmt: skip


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def memory_text(reading: MemoryReading | None) -> str:
    """The reading for the log: each device's free and total memory, with its name
    (``gpu0 (NVIDIA H200): 120.50 GiB free of 139.80 GiB; gpu1 (NVIDIA H200): unknown``)."""
    if reading is None:
        return "memory unknown"
    parts = []
    for d in reading.devices:
        figures = "unknown" if d.free_bytes is None else f"{_gib(d.free_bytes)} free of {_gib(d.total_bytes)}"
        parts.append(f"{d.device} ({d.name}): {figures}")
    return "; ".join(parts) or f"{reading.device}: {_gib(reading.free_bytes)} free"


class CgroupHostProbe:
    """Host memory: psutil's available memory, bounded by the cgroup v2 limits of this process's
    own cgroup (its path from ``/proc/self/cgroup``) and of every cgroup above it
    (``memory.max`` - ``memory.current``, the tightest wins), so a container's limit and a limit
    set on a sub-cgroup outside a container are both respected."""

    def __init__(self, cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> None:
        self._root = cgroup_root
        self._self = self_cgroup
        self._warn = WarnOnce()

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

    def _cgroup(self) -> tuple[int, int, Path] | None:
        """(limit, usage) in bytes of the tightest cgroup v2 limit, and its folder; None where
        none is set."""
        tightest: tuple[int, int, Path] | None = None
        for folder in self._own_dirs():
            try:
                raw = (folder / "memory.max").read_text().strip()
                if raw == "max":
                    continue
                limit, usage = int(raw), int((folder / "memory.current").read_text())
            except (OSError, ValueError):
                continue
            if tightest is None or limit - usage < tightest[0] - tightest[1]:
                tightest = (limit, usage, folder)
        return tightest

    def read(self) -> MemoryReading | None:
        try:
            vm = psutil.virtual_memory()
        except Exception as exc:
            self._warn.failed("host memory", exc)
            return None
        total, free, name = int(vm.total), int(vm.available), "host"
        source: MemorySource = "host"
        cg = self._cgroup()
        if cg is not None and cg[0] - cg[1] < free:
            limit, usage, folder = cg
            total, free, source = limit, max(0, limit - usage), "cgroup"
            name = "cgroup /" + folder.relative_to(self._root).as_posix().removeprefix(".")
        device = DeviceMemory(
            device="host", name=name, total_bytes=total, used_bytes=total - free, free_bytes=free
        )
        return combine(source, [device])


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
        device = DeviceMemory(
            device="scripted", name="scripted", total_bytes=self.total_bytes,
            used_bytes=self.total_bytes - self.free_bytes, free_bytes=self.free_bytes,
        )  # fmt: skip
        return combine("scripted", [device])
