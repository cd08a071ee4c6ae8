"""A scripted NVML: pynvml's functions replaced by GPUs whose memory a test sets.

A FakeGpu's used memory is what the test says others use, plus what ``holds`` says the runtime
holds on it now (its weights and KV cache), as a real GPU's used memory includes our own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml
import pytest

GiB = 1 << 30


@dataclass
class FakeGpu:
    """One GPU as NVML shows it; ``failing`` makes its memory-info call raise."""

    name: str = "NVIDIA H200"
    total_bytes: int = 80 * GiB
    others_bytes: int = 0
    """Used by other processes; the test changes it."""
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    holds: Callable[[], int] = lambda: 0
    """Bytes the runtime holds on this GPU now."""
    failing: bool = False
    reads: int = field(default=0, init=False)

    @property
    def used_bytes(self) -> int:
        return min(self.total_bytes, self.others_bytes + self.holds())

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes


class FakeNvml:
    """NVML over ``gpus`` (NVML index = position); ``init_fails`` makes nvmlInit raise."""

    def __init__(self, *gpus: FakeGpu, init_fails: bool = False) -> None:
        self.gpus = list(gpus)
        self.init_fails = init_fails
        self.inits = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
        """Replace pynvml's functions (and unset CUDA_VISIBLE_DEVICES) for this test."""
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        for name in (
            "nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetHandleByUUID",
            "nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo",
        ):  # fmt: skip
            monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self.inits += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        if handle.failing:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        handle.reads += 1
        return SimpleNamespace(total=handle.total_bytes, used=handle.used_bytes, free=handle.free_bytes)
