"""The host's memory probe: the process's own cgroup and those above it (NVML: test_nvml.py)."""

from __future__ import annotations

from pathlib import Path

from runtime.core.telemetry import CgroupHostProbe

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
    assert [(d.device, d.name, d.free_bytes) for d in reading.devices] == [
        ("host", "cgroup /user.slice/job", GiB)
    ]


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
    assert host is not None and host.source == "host" and (host.free_bytes or 0) > 0
