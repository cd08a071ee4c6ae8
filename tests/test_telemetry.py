"""Memory probes: the process's own cgroup and those above it; a failing NVML reads as unknown."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from runtime.core.telemetry import CgroupHostProbe, NvmlProbe

GiB = 1 << 30


def _cgroup(folder: Path, limit: str, usage: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.max").write_text(limit + "\n")
    (folder / "memory.current").write_text(f"{usage}\n")


def test_a_limit_on_the_processs_own_sub_cgroup_counts(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _cgroup(root, "max", 0)
    _cgroup(root / "user.slice", f"{64 * GiB}", 10 * GiB)
    _cgroup(root / "user.slice" / "job", f"{2 * GiB}", GiB)  # the tightest: 1 GiB left
    (root / "elsewhere").mkdir()
    _cgroup(root / "elsewhere", f"{GiB // 2}", 0)  # another process's cgroup: not ours
    own = tmp_path / "self-cgroup"
    own.write_text("4:memory:/ignored-v1-line\n0::/user.slice/job\n")
    reading = CgroupHostProbe(root, own).read()
    assert reading is not None
    assert (reading.source, reading.total_bytes, reading.free_bytes) == ("cgroup", 2 * GiB, GiB)


def test_a_limit_above_the_own_cgroup_counts_and_no_limit_means_the_host(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _cgroup(root, "max", 0)
    _cgroup(root / "a", f"{3 * GiB}", GiB)  # 2 GiB left, set on the parent
    _cgroup(root / "a" / "b", "max", 0)
    own = tmp_path / "self-cgroup"
    own.write_text("0::/a/b\n")
    limited = CgroupHostProbe(root, own).read()
    assert limited is not None and (limited.source, limited.free_bytes) == ("cgroup", 2 * GiB)
    own.write_text("0::/\n")
    host = CgroupHostProbe(root, own).read()
    assert host is not None and host.source == "host" and host.free_bytes > 0


def test_a_failing_nvml_call_reads_as_unknown_never_as_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("pynvml")

    def fail(*args: object) -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = NvmlProbe(0)
    assert probe.read() is None
    assert probe.read() is None  # and again, logged once
