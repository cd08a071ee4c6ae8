"""Many models in one Runtime (fake backends on a simulated device): routing by name, loading on
the first request, keep_alive, pinned models, memory-aware eviction and the refusal of a model
that cannot fit."""

from __future__ import annotations

import math
import threading
import time

import anyio
import pytest

from runtime.backends.fake import FakeBackend
from runtime.core.config import RuntimeConfig
from runtime.core.errors import ModelMemoryError, ModelNotFoundError, RuntimeClosedError, TenantQueueFullError
from runtime.core.registry import ModelSpec
from tests.helpers import greedy, wait_until
from tests.model_fleet import Device, Fleet, MiB, fleet_runtime

SCRIPTS = {
    "default": {"hi": "from the default"},
    "a.gguf": {"hi": "alpha answers"},
    "b.gguf": {"hi": "bravo answers"},
}


def fleet(capacity_bytes: int, a: int = 100 * MiB, b: int = 100 * MiB) -> Fleet:
    return Fleet(Device(capacity_bytes), {"default": 10 * MiB, "a.gguf": a, "b.gguf": b}, SCRIPTS)


A = ModelSpec(name="a", path="a.gguf")
B = ModelSpec(name="b", path="b.gguf")


async def test_two_models_at_once_each_answer_as_alone_and_load_once() -> None:
    f = fleet(1 << 40)
    async with fleet_runtime(f, [A, B]) as rt:
        solo = {m: (await rt.complete(greedy("hi", 32), model=m)).text for m in ("a", "b")}
        solo["default"] = (await rt.complete(greedy("hi", 32))).text
        answers: dict[tuple[str, int], str] = {}

        async def one(model: str, i: int) -> None:
            answers[model, i] = (await rt.complete(greedy("hi", 32), model=model)).text

        async with anyio.create_task_group() as tg:
            for i in range(4):
                for model in ("a", "b", "default", "A:latest"):
                    tg.start_soon(one, model, i)
        loaded = {m.name: m for m in rt.loaded_models()}
    assert solo == {"a": "alpha answers", "b": "bravo answers", "default": "from the default"}
    for (model, _), text in answers.items():
        assert text == solo[model.casefold().removesuffix(":latest")]
    assert f.loads == {"default": 1, "a.gguf": 1, "b.gguf": 1}  # each model's weights load once
    assert set(loaded) == {"default", "a", "b"}
    assert loaded["a"].state == "ready" and loaded["a"].size_bytes == 100 * MiB + 2 * MiB


async def test_a_name_outside_the_registry_is_refused_and_nothing_loads() -> None:
    f = fleet(1 << 40)
    async with fleet_runtime(f, [A]) as rt:
        for name in ("nope", "/tmp/a.gguf", "a.gguf"):
            with pytest.raises(
                ModelNotFoundError, match="not found; this server serves: default:latest, a:latest"
            ):
                rt.generate(greedy("hi"), model=name)
    assert f.loads == {"default": 1}


async def test_a_budget_for_one_model_waits_for_the_first_then_evicts_it() -> None:
    """Room for the default and one of a, b: b's request waits while a serves, then a is evicted."""
    f = fleet(10 * MiB + 2 * MiB + 150 * MiB)
    f.step_delay_s = 0.002
    async with fleet_runtime(f, [A, B]) as rt:
        events: list[str] = []

        async def ask(model: str, max_tokens: int) -> None:
            await rt.complete(greedy("long " + model, max_tokens), model=model)
            events.append(f"{model} done")

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "a", 60)
            await wait_until(lambda: any(m.name == "a" and m.slots_busy == 1 for m in rt.loaded_models()))
            tg.start_soon(ask, "b", 4)
            await wait_until(lambda: any(m.name == "b" for m in rt.loaded_models()))
            b_entry = {m.name: m for m in rt.loaded_models()}["b"]
            assert b_entry.state == "loading"  # /api/ps shows it loading while it waits
            assert rt.status().state == "ready"  # the default serves on (/health stays 200)
        names = [m.name for m in rt.loaded_models()]
        closed = [b.closed for b in f.device.backends]
    assert events == ["a done", "b done"]  # b waited for a's request, never cut it short
    assert names == ["default", "b"]  # a was evicted for b
    assert f.loads == {"default": 1, "a.gguf": 1, "b.gguf": 1}
    assert closed == [False, True, False]  # a's backend was closed before b's was made


async def test_keep_alive_zero_unloads_after_the_request_and_a_duration_later() -> None:
    f = fleet(1 << 40)
    async with fleet_runtime(f, [A, B], keep_alive="-1") as rt:
        answer = await rt.complete(greedy("hi"), model="a", keep_alive=0)
        assert answer.text == "alpha answers"
        await wait_until(lambda: [m.name for m in rt.loaded_models()] == ["default"], timeout_s=5)
        await rt.complete(greedy("hi"), model="b", keep_alive="50ms")
        listed = {m.name: m for m in rt.loaded_models()}
        assert listed["b"].keep_alive_s == 0.05 and listed["b"].expires_at_unix_s is not None
        await wait_until(lambda: [m.name for m in rt.loaded_models()] == ["default"], timeout_s=5)
        await rt.complete(greedy("hi"), model="b")  # the runtime's keep_alive: -1, for good
        await anyio.sleep(0.1)
        forever = {m.name: m for m in rt.loaded_models()}["b"]
        assert forever.keep_alive_s == math.inf and forever.expires_at_unix_s is None
        assert await rt.unload("b") is True  # idle: unloaded now
        assert [m.name for m in rt.loaded_models()] == ["default"]
    assert f.loads["a.gguf"] == 1 and f.loads["b.gguf"] == 2


async def test_a_pinned_model_loads_at_start_and_is_never_evicted() -> None:
    f = fleet(10 * MiB + 2 * MiB + 150 * MiB)
    pinned = ModelSpec(name="a", path="a.gguf", pinned=True)
    async with fleet_runtime(f, [pinned, B], keep_alive=0) as rt:
        await wait_until(lambda: any(m.name == "a" and m.state == "ready" for m in rt.loaded_models()), 5)
        await rt.complete(greedy("hi"), model="a")
        assert await rt.unload("a") is False
        with pytest.raises(ModelMemoryError) as refused:
            await rt.complete(greedy("hi"), model="b")
        assert [m.name for m in rt.loaded_models()] == ["default", "a"]
    assert refused.value.needed_bytes == 102 * MiB
    assert f.loads["b.gguf"] == 0


async def test_a_model_that_cannot_fit_is_refused_at_once_with_both_byte_counts() -> None:
    f = fleet(10 * MiB + 2 * MiB + 50 * MiB, a=500 * MiB)
    async with fleet_runtime(f, [A]) as rt:
        started = time.perf_counter()
        with pytest.raises(ModelMemoryError) as refused:
            await rt.complete(greedy("hi"), model="a")
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        with pytest.raises(ModelMemoryError):  # known now: refused before any stream exists
            rt.generate(greedy("hi"), model="a")
        again_s = time.perf_counter() - started
        assert rt.status().state == "ready"
    err = refused.value
    assert (err.needed_bytes, err.free_bytes) == (502 * MiB, 50 * MiB)
    assert "502" not in str(err) or f"{502 * MiB:,}" in str(err)
    assert f"{502 * MiB:,} bytes" in str(err) and f"{50 * MiB:,} bytes are free" in str(err)
    assert f.loads["a.gguf"] == 0  # nothing was loaded to find out
    print(f"refused in {first_s * 1e3:.1f} ms (first), {again_s * 1e3:.2f} ms (known)")


async def test_each_model_has_its_status_and_its_metrics_under_its_name() -> None:
    f = fleet(1 << 40)
    async with fleet_runtime(f, [A, B]) as rt:
        await rt.complete(greedy("hi"), model="a")
        await rt.complete(greedy("hi"), model="b")
        await rt.complete(greedy("hi"), model="b")
        status = rt.status("a")
        statuses = {m: rt.status(m).requests_completed for m in ("default", "a", "b")}
        registry = rt.registry
        completed = {
            m: registry.get_sample_value(
                "slotserve_requests_total", {"model": m, "outcome": "completed", "reason": "stop"}
            )
            for m in ("a", "b")
        }
        busy = {m: registry.get_sample_value("slotserve_slots_effective", {"model": m}) for m in ("a", "b")}
    assert status.model == "a" and status.state == "ready"
    assert statuses == {"default": 0, "a": 1, "b": 2}
    assert completed == {"a": 1.0, "b": 2.0}
    assert busy == {"a": 2.0, "b": 2.0}


async def test_a_request_never_read_does_not_hold_its_model_loaded() -> None:
    f = fleet(1 << 40)
    async with fleet_runtime(f, [A], keep_alive=0) as rt:
        stream = rt.generate(greedy("hi"), model="a")  # the load starts; nobody reads the stream
        await wait_until(lambda: any(m.name == "a" and m.state == "ready" for m in rt.loaded_models()), 5)
        await stream.aclose()
        await wait_until(lambda: [m.name for m in rt.loaded_models()] == ["default"], timeout_s=5)


async def test_two_models_growing_at_once_share_the_free_bytes() -> None:
    """Slots auto and live resizing on every model: spare bytes are taken once, not by each."""
    slot, model = 1 * MiB, 100 * MiB + 1 * MiB
    f = fleet(10 * MiB + slot)  # the default with one slot, no more
    cfg = {"slots": "auto", "min_slots": 1, "max_slots": 16, "resize_interval_s": 0.002, "resize_cooldown_s": 0.0,
           "resize_hysteresis": 0.0}  # fmt: skip
    async with fleet_runtime(f, [A, B], **cfg) as rt:
        f.device.capacity_bytes += 2 * model  # room for a and b with one slot each
        async with anyio.create_task_group() as tg:
            for m in ("a", "b"):
                tg.start_soon(rt.load, m)
        f.device.capacity_bytes += 4 * slot  # room for four more slots, in all
        most = 0
        with anyio.move_on_after(0.3):  # many readings by all three supervisors
            while True:
                most = max(most, f.device.used_bytes())
                await anyio.sleep(0.001)
        used, capacity = f.device.used_bytes(), f.device.capacity_bytes
        slots = {m: rt.status(m).slots_effective for m in ("default", "a", "b")}
    assert most <= capacity, slots  # never two growing into the same free bytes
    assert used == capacity and sum(slots.values()) == 3 + 4


async def test_no_model_loads_while_draining_or_after_close() -> None:
    f = fleet(1 << 40)
    async with fleet_runtime(f, [A]) as rt:
        await rt.drain(1.0)
        with pytest.raises(RuntimeClosedError, match="draining"):
            rt.generate(greedy("hi"), model="a")
    with pytest.raises(RuntimeClosedError):
        rt.generate(greedy("hi"), model="a")
    assert f.loads == {"default": 1}


class GatedFleet(Fleet):
    """A fleet whose model ``a.gguf`` loads only once ``gate`` is set."""

    def __init__(self, capacity_bytes: int) -> None:
        base = fleet(capacity_bytes)
        super().__init__(base.device, base.weights, base.scripts)
        self.gate = threading.Event()

    def load(self, config: RuntimeConfig, n_seq: int) -> FakeBackend:
        if config.model == "a.gguf":
            self.gate.wait(30)
        return super().load(config, n_seq)


async def test_a_tenant_over_its_queue_cap_is_refused_while_its_model_loads_and_counted() -> None:
    f = GatedFleet(1 << 40)
    async with fleet_runtime(f, [A], tenant_max_queued=2, max_queue=8) as rt:
        waiting = [rt.generate(greedy("hi", 32, tenant="t"), model="a") for _ in range(2)]
        with pytest.raises(TenantQueueFullError, match="tenant_max_queued"):
            rt.generate(greedy("hi", 32, tenant="t"), model="a")
        other = rt.generate(greedy("hi", 32, tenant="u"), model="a")  # another tenant still waits
        f.gate.set()
        answers = [(await s.collect()).text for s in [*waiting, other]]
        assert answers == ["alpha answers"] * 3
        assert rt.status("a").requests_rejected == 1  # the refusal before the mailbox counts
