"""The merged features together (fake backend): many models x admission, the slot door x the
fair queue, resizes with both in place. Each test is a seam found by attacking the merge."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

from runtime import DeadlineUnmetError, Runtime
from runtime.backends.fake import FakeBackend
from runtime.core.config import RuntimeConfig
from runtime.core.registry import ModelSpec
from tests.helpers import greedy, open_runtime, wait_until
from tests.model_fleet import Device, Fleet, fleet_runtime

MiB = 1 << 20
A = ModelSpec(name="a", path="a.gguf")


class SlowFleet(Fleet):
    """A fleet whose loads wait for ``gate`` (a model that is still loading)."""

    def __init__(self) -> None:
        super().__init__(Device(1 << 40), {"default": 10 * MiB, "a.gguf": 10 * MiB}, {})
        self.gate = threading.Event()

    def load(self, config: RuntimeConfig, n_seq: int) -> FakeBackend:
        if config.model != "default":
            self.gate.wait(10)
        return super().load(config, n_seq)


async def test_a_deadline_counts_the_wait_for_the_models_load() -> None:
    """deadline_ms bounds the first token from when the caller asked: a model that loads past
    it refuses the request (DeadlineUnmetError), never serves it late."""
    f = SlowFleet()
    async with fleet_runtime(f, [A]) as rt:
        stream = rt.generate(greedy("hi", 4, deadline_ms=50), model="a")
        late = rt.generate(greedy("hi", 4), model="a")
        async with anyio.create_task_group() as tg:

            async def release() -> None:
                await anyio.sleep(0.3)
                f.gate.set()

            tg.start_soon(release)
            start = time.perf_counter()
            with pytest.raises(DeadlineUnmetError, match="deadline_ms is 50"):
                await stream.collect()
            assert time.perf_counter() - start >= 0.25
            assert (await late.collect()).text  # the model serves on
