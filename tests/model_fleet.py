"""A fleet of fake models for the many-model tests: a registry of named FakeBackends whose
memory a simulated device accounts for, so that placement sees loads and unloads as a GPU's
free memory would show them."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CollectorRegistry

from runtime.backends.fake import FakeBackend
from runtime.core.config import RuntimeConfig
from runtime.core.records import DeviceMemory, MemoryReading
from runtime.core.registry import ModelRegistry, ModelSpec
from runtime.core.telemetry import combine
from runtime.runtime import Runtime

MiB = 1 << 20
SLOT_BYTES = 1 * MiB


def script(text: str) -> list[int]:
    """The fake's token ids of ``text`` (one per byte)."""
    return [1 + b for b in text.encode()]


class Device:
    """A device of ``capacity_bytes`` whose used memory is every live FakeBackend's weights and
    KV cache (read from a worker thread, as a probe is)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.backends: list[FakeBackend] = []
        self._lock = threading.Lock()

    def add(self, backend: FakeBackend) -> None:
        with self._lock:
            self.backends.append(backend)

    def used_bytes(self) -> int:
        with self._lock:
            live = [b for b in self.backends if not b.closed]
        return sum(b.info.weights_bytes + b.info.n_seq_max * b.info.kv_bytes_per_slot for b in live)

    def read(self) -> MemoryReading | None:
        used = self.used_bytes()
        free = self.capacity_bytes - used  # below 0 when a test shrank the device under its models
        device = DeviceMemory(
            device="sim", name="simulated", total_bytes=self.capacity_bytes, used_bytes=used, free_bytes=free
        )
        return combine("scripted", [device])


class Fleet:
    """Models by path: their weights' size, their scripts, and how often each was loaded."""

    def __init__(self, device: Device, weights: dict[str, int], scripts: dict[str, dict[str, str]]) -> None:
        self.device = device
        self.weights = weights
        self.scripts = scripts
        self.loads: Counter[str] = Counter()
        self.step_delay_s = 0.0

    def load(self, config: RuntimeConfig, n_seq: int) -> FakeBackend:
        self.loads[config.model] += 1
        backend = FakeBackend(
            n_seq_max=n_seq, n_ctx_per_slot=config.n_ctx_per_slot, weights_bytes=self.weights[config.model],
            kv_bytes_per_slot=SLOT_BYTES, step_delay_s=self.step_delay_s,
            scripts={p: script(t) for p, t in self.scripts.get(config.model, {}).items()},
        )  # fmt: skip
        self.device.add(backend)
        return backend

    def estimate(self, config: RuntimeConfig) -> int:
        return self.weights[config.model] + config.initial_slots * SLOT_BYTES


@asynccontextmanager
async def fleet_runtime(fleet: Fleet, specs: list[ModelSpec], **config: Any) -> AsyncIterator[Runtime]:
    """A Runtime whose default model is the path ``default`` and whose registry holds ``specs``,
    all loaded by ``fleet`` and accounted on its device."""
    config.setdefault("n_ctx_per_slot", 256)
    config.setdefault("slots", 2)
    config.setdefault("memory_headroom_bytes", 0)
    config.setdefault("memory_headroom_fraction", 0.0)
    config.setdefault("resize_interval_s", 0)
    cfg = RuntimeConfig(backend="fake", model="default", **config)
    models = ModelRegistry(specs, default=ModelSpec(name="default", path="default", pinned=True))
    rt = Runtime(
        cfg, registry=CollectorRegistry(), probe=fleet.device, models=models, load=fleet.load,
        estimate_bytes=fleet.estimate,
    )  # fmt: skip
    async with rt:
        yield rt
