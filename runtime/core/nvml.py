"""GPU memory through NVML (nvidia-ml-py), of the GPUs that hold the model.

Which GPUs: those llama.cpp puts the model on (runtime.core.placement, from ``split_mode``,
``main_gpu`` and ``tensor_split``), numbered as CUDA numbers the GPUs it shows this process.
``CUDA_VISIBLE_DEVICES`` maps them to NVML's devices as CUDA reads it: a comma-separated list
of indices or ``GPU-``/``MIG-`` UUIDs (a UUID prefix is matched against each GPU's UUID), which
ends at the first entry that is not one (an index out of range, a repeat, ``-1``); empty, no GPU
is visible. An index is taken as NVML's index, which is CUDA's with ``CUDA_DEVICE_ORDER=
PCI_BUS_ID`` and on a machine of like GPUs (CUDA's default order puts the fastest first).

Each device reads on its own: one whose NVML call fails is unknown (its figures None, logged
once), never zero, and the others still read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from runtime.core.config import RuntimeConfig, SplitMode
from runtime.core.placement import kv_shares
from runtime.core.records import DeviceMemory, MemoryReading
from runtime.core.telemetry import WarnOnce, combine

__all__ = ["NvmlProbe", "visible_gpus"]

GpuId = int | str
"""An NVML index, or a UUID (or its prefix) as CUDA_VISIBLE_DEVICES names a GPU."""


def visible_gpus(cuda_visible_devices: str | None, count: int) -> list[GpuId]:
    """The NVML devices CUDA shows, in CUDA's order (see the module docstring).

    :param cuda_visible_devices: the variable's value; None when it is unset (every GPU).
    :param count: NVML's device count.
    """
    if cuda_visible_devices is None:
        return list(range(count))
    gpus: list[GpuId] = []
    for raw in cuda_visible_devices.split(","):
        entry = raw.strip()
        if entry.isdigit() and int(entry) < count and int(entry) not in gpus:
            gpus.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")) and entry not in gpus:
            gpus.append(entry)
        else:
            break  # CUDA ignores this entry and every one after it
    return gpus


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlProbe:
    """Memory of each GPU the model uses (free, used and total bytes), read through NVML.

    :param split_mode: llama.cpp's, as in RuntimeConfig (``none``: ``main_gpu`` alone).
    :param main_gpu: the GPU that holds the model (``none``) or its KV cache (``row``).
    :param tensor_split: each GPU's share of the model; () for llama.cpp's default.
    :param cuda_visible_devices: the mapping of CUDA's GPUs to NVML's; by default the
        environment's ``CUDA_VISIBLE_DEVICES`` when the probe is made.
    """

    def __init__(
        self,
        *,
        split_mode: SplitMode = "none",
        main_gpu: int = 0,
        tensor_split: Sequence[float] = (),
        cuda_visible_devices: str | None = None,
    ) -> None:
        self._split = (split_mode, main_gpu, tuple(tensor_split))
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._visible_env = cuda_visible_devices if cuda_visible_devices is not None else env
        self._visible: list[GpuId] | None = None  # known once NVML is initialized
        self._handles: dict[int, tuple[object, str]] = {}  # CUDA ordinal -> (handle, name)
        self._warn = WarnOnce()

    @classmethod
    def for_config(cls, config: RuntimeConfig) -> NvmlProbe:
        """The probe of the GPUs ``config`` puts the model on."""
        return cls(split_mode=config.split_mode, main_gpu=config.main_gpu, tensor_split=config.tensor_shares)

    def read(self) -> MemoryReading | None:
        """Each GPU's memory now; None when NVML cannot start or shows no GPU the model uses."""
        try:
            import pynvml

            if self._visible is None:
                pynvml.nvmlInit()
                self._visible = visible_gpus(self._visible_env, int(pynvml.nvmlDeviceGetCount()))
        except Exception as exc:
            self._warn.failed("GPU memory (NVML)", exc)
            return None
        shares = kv_shares(*self._split, len(self._visible))
        if not shares:
            self._warn.failed(
                "GPU memory (NVML)",
                LookupError(f"no GPU visible (CUDA_VISIBLE_DEVICES={self._visible_env!r})"),
            )
            return None
        return combine("nvml", [self._device(pynvml, gpu, share) for gpu, share in shares.items()])

    def _device(self, nvml: Any, gpu: int, share: float) -> DeviceMemory:
        """One GPU's figures, or its unknown ones where NVML fails for it."""
        label = f"gpu{gpu}"
        try:
            if gpu not in self._handles:
                handle = self._handle(nvml, gpu)
                self._handles[gpu] = (handle, _text(nvml.nvmlDeviceGetName(handle)))
            handle, name = self._handles[gpu]
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            total, used, free = int(info.total), int(info.used), int(info.free)
        except Exception as exc:
            self._warn.failed(f"{label} memory (NVML)", exc)
            name = self._handles[gpu][1] if gpu in self._handles else "unknown"
            return DeviceMemory(
                device=label, name=name, total_bytes=None, used_bytes=None, free_bytes=None, kv_share=share
            )
        return DeviceMemory(
            device=label, name=name, total_bytes=total, used_bytes=used, free_bytes=free, kv_share=share
        )

    def _handle(self, nvml: Any, gpu: int) -> object:
        """NVML's handle of CUDA's GPU ``gpu``.

        :raises LookupError: if CUDA shows no such GPU, or no GPU has the UUID it is named by.
        """
        assert self._visible is not None
        if gpu >= len(self._visible):
            raise LookupError(f"CUDA shows {len(self._visible)} GPU(s); there is no GPU {gpu}")
        target = self._visible[gpu]
        if isinstance(target, int):
            return nvml.nvmlDeviceGetHandleByIndex(target)
        try:
            return nvml.nvmlDeviceGetHandleByUUID(target)
        except Exception:
            for index in range(int(nvml.nvmlDeviceGetCount())):  # a UUID prefix, as CUDA takes it
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                if _text(nvml.nvmlDeviceGetUUID(handle)).startswith(target):
                    return handle
        raise LookupError(f"no GPU's UUID begins with {target!r} (CUDA_VISIBLE_DEVICES)")
