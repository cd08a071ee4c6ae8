"""A hypothesis state machine over many models on a simulated device: requests to three models
with random keep_alive, cancels, explicit loads, memory changes and keep_alive expiry. After
every step: every request ended at most once, and none was cut short by an eviction; every load
fitted in the memory its plan read. At the end: every admitted request ended exactly once."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from runtime.backends.fake import FakeBackend
from runtime.core.config import RuntimeConfig
from runtime.core.errors import ModelMemoryError, QueueFullError, SlotserveError
from runtime.core.records import MemoryReading
from runtime.core.registry import ModelSpec
from runtime.core.ticket import ResponseStream
from tests.helpers import greedy
from tests.model_fleet import Device, Fleet, MiB, fleet_runtime
from tests.test_stateful import Ends

MODELS = ("a", "b", "c")
SIZES = {"default": 8 * MiB, "a.gguf": 40 * MiB, "b.gguf": 60 * MiB, "c.gguf": 90 * MiB}
ALLOWED = {"stop", "length", "reader cancelled", "ModelMemoryError", "QueueFullError"}
"""How a request may end here: nothing but the reader's own cancel or a refusal cuts one short."""


class CheckedDevice(Device):
    """Remembers the largest capacity it was read at since the last load: the plan of a load
    read it then (the test may change the capacity while a load runs)."""

    read_capacity: int | None = None

    def read(self) -> MemoryReading | None:
        reading = super().read()
        if reading is not None and reading.total_bytes is not None:
            self.read_capacity = max(self.read_capacity or 0, reading.total_bytes)
        return reading


class CheckedFleet(Fleet):
    """Checks that each load fits: what is loaded now plus the new model within the capacity
    that the plan read (the test may change the capacity while a load waits)."""

    device: CheckedDevice

    def __init__(self, device: CheckedDevice) -> None:
        super().__init__(device, SIZES, {})
        self.step_delay_s = 0.0005
        self.overloads: list[str] = []

    def load(self, config: RuntimeConfig, n_seq: int) -> FakeBackend:
        need, used, capacity = self.estimate(config), self.device.used_bytes(), self.device.read_capacity
        if config.model != "default" and capacity is not None and used + need > capacity:
            live = [
                (b.info.weights_bytes >> 20, b.info.n_seq_max) for b in self.device.backends if not b.closed
            ]
            self.overloads.append(f"{config.model} needs {need} bytes; {used} of {capacity} are used: {live}")
        self.device.read_capacity = None
        return super().load(config, n_seq)


class ModelsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.portal_cm = start_blocking_portal()
        self.portal: BlockingPortal = self.portal_cm.__enter__()
        self.fleet = CheckedFleet(CheckedDevice(8 * MiB + 2 * MiB + 160 * MiB))
        self.ends = Ends()
        specs = [ModelSpec(name=m, path=f"{m}.gguf") for m in MODELS]
        cm = fleet_runtime(self.fleet, specs, max_queue=3, max_loaded_models=3, keep_alive="-1", slots=2)
        self.rt_cm = self.portal.wrap_async_context_manager(cm)
        self.rt = self.rt_cm.__enter__()
        self.rt.observers.add(self.ends)
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.outcomes: dict[int, list[str]] = {}

    def _consume(self, i: int, stream: ResponseStream) -> None:
        scope = self.scopes[i] = self.portal.call(anyio.CancelScope)

        async def read() -> None:
            with scope:
                try:
                    result = await stream.collect()
                    self.outcomes[i].append(result.done_reason)
                except SlotserveError as exc:
                    self.outcomes[i].append(type(exc).__name__)
            if scope.cancelled_caught:
                self.outcomes[i].append("reader cancelled")

        self.portal.start_task_soon(read)

    @rule(
        model=st.sampled_from(MODELS),
        max_tokens=st.integers(1, 20),
        keep_alive=st.sampled_from([None, 0, "10ms", -1]),
    )
    def request(self, model: str, max_tokens: int, keep_alive: Any) -> None:
        def submit() -> ResponseStream:
            return self.rt.generate(greedy(f"to {model}", max_tokens), model=model, keep_alive=keep_alive)

        try:
            stream = self.portal.call(submit)
        except (ModelMemoryError, QueueFullError):  # refused at once: no memory for it, or its queue is full
            return
        i = len(self.outcomes)
        self.outcomes[i] = []
        self._consume(i, stream)

    @rule(which=st.integers(0, 1 << 16))
    def cancel(self, which: int) -> None:
        """Cancel the reader of one request (drawn the same whichever were admitted)."""
        if self.scopes:
            self.portal.call(self.scopes[sorted(self.scopes)[which % len(self.scopes)]].cancel)

    @rule(model=st.sampled_from(MODELS))
    def load(self, model: str) -> None:
        async def load() -> None:
            with contextlib.suppress(ModelMemoryError):
                await self.rt.load(model)

        self.portal.start_task_soon(load)

    @rule(capacity_mib=st.integers(60, 260))
    def memory_changes(self, capacity_mib: int) -> None:
        self.fleet.device.capacity_bytes = capacity_mib * MiB

    @rule()
    def keep_alive_expires(self) -> None:
        self.portal.call(anyio.sleep, 0.02)

    @invariant()
    def nothing_cut_short_and_every_load_fitted(self) -> None:
        for i, ends in self.outcomes.items():
            assert len(ends) <= 1, f"request {i} ended {len(ends)} times"
            assert set(ends) <= ALLOWED, f"request {i} ended {ends}"
        assert self.fleet.overloads == []

    def teardown(self) -> None:
        try:
            self.fleet.device.capacity_bytes = 1 << 40  # everything waiting for room now loads

            async def drain() -> None:
                with anyio.fail_after(20):
                    while any(len(v) == 0 for v in self.outcomes.values()):
                        await anyio.sleep(0.001)

            self.portal.call(drain)
            assert all(len(v) == 1 for v in self.outcomes.values())  # each ended exactly once
            assert all(set(v) <= ALLOWED for v in self.outcomes.values())
            admitted = sum(
                1 for v in self.outcomes.values() if v[0] not in ("ModelMemoryError", "QueueFullError")
            )
            assert self.ends.finished >= admitted - sum(
                1 for v in self.outcomes.values() if v == ["reader cancelled"]
            )
        finally:
            self.rt_cm.__exit__(None, None, None)
            self.portal_cm.__exit__(None, None, None)


ModelsMachine.TestCase.settings = settings(
    max_examples=20, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestModelsMachine = ModelsMachine.TestCase
