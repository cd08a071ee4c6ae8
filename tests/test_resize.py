"""Memory-driven slot counts: startup sizing, live resizing, and resizing under load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from runtime import Completion, ConfigError, Runtime, RuntimeConfig
from runtime.backends.fake import FakeBackend
from runtime.core.telemetry import CgroupHostProbe, ScriptedProbe
from tests.helpers import BACKENDS, PROMPTS, greedy, open_runtime, require_backend, wait_until

MiB = 1 << 20
KV = MiB  # the fake backend's KV bytes per slot
NO_HEADROOM: dict[str, Any] = {"memory_headroom_fraction": 0.0, "memory_headroom_bytes": 0}


def fake_runtime(
    probe: ScriptedProbe, registry: CollectorRegistry | None = None, **config: object
) -> Runtime:
    cfg = RuntimeConfig(backend="fake", **{**NO_HEADROOM, **config})
    return Runtime(cfg, backend=FakeBackend(n_seq_max=1), probe=probe, registry=registry)


async def test_auto_takes_what_fits_and_follows_memory_down_and_up() -> None:
    probe = ScriptedProbe(free_bytes=6 * KV)  # with the 1-slot start context: 7 fit
    cfg: dict[str, Any] = {
        "slots": "auto",
        "max_slots": 8,
        "resize_interval_s": 0.02,
        "resize_cooldown_s": 0.1,
    }
    async with fake_runtime(probe, **cfg) as rt:
        first = rt.status()
        assert (first.slots_configured, first.slots_effective, first.slots_auto) == (7, 7, True)
        probe.free_bytes = -2 * KV  # someone else took memory: 2 slots' worth beyond what we hold
        await wait_until(lambda: rt.status().slots_effective == 5)
        low = rt.status()
        probe.free_bytes = 10 * KV
        await wait_until(lambda: rt.status().slots_effective == 8)
        high = rt.status()
    assert low.last_resize is not None and low.last_resize.reason == "memory_low"
    assert low.slots_target == 5 and low.memory is not None and low.memory.free_bytes == -2 * KV
    assert (
        high.last_resize is not None
        and high.last_resize.reason == "memory_available"
        and high.last_resize.to_slots == 8
    )
    assert high.resizes == 2


async def test_wobbling_readings_resize_at_most_once() -> None:
    probe = ScriptedProbe(free_bytes=3 * KV)  # 4 fit with the 1-slot start context
    cfg: dict[str, Any] = {
        "slots": 4,
        "resize_interval_s": 0.01,
        "resize_cooldown_s": 0.0,
        "resize_hysteresis": 0.5,
    }
    async with fake_runtime(probe, **cfg) as rt:
        assert rt.status().slots_effective == 4
        for i in range(60):  # around the point where exactly 4 fit, by a third of a slot
            probe.free_bytes = (KV // 3) * (1 if i % 2 else -1) + (4 - rt.status().slots_effective) * KV
            await anyio.sleep(0.012)
        status = rt.status()
    assert status.resizes <= 1


async def test_a_set_count_that_does_not_fit_is_reduced_or_refused() -> None:
    probe = ScriptedProbe(free_bytes=2 * KV)  # 3 fit (with the 1-slot start context)
    registry = CollectorRegistry()
    async with fake_runtime(probe, registry=registry, slots=6, resize_interval_s=0) as rt:
        status = rt.status()
    assert (status.slots_configured, status.slots_effective) == (6, 3)
    assert status.resizes == 1 and status.last_resize is not None  # a reduced count is never silent
    assert (status.last_resize.reason, status.last_resize.from_slots, status.last_resize.to_slots) == (
        "startup",
        6,
        3,
    )
    labels = {"model": "fake", "direction": "shrink", "reason": "startup"}
    assert registry.get_sample_value("slotserve_slot_resizes_total", labels) == 1.0
    with pytest.raises(
        ConfigError, match=r"6 slots need 6,291,456 bytes of KV cache .* 3,145,728 bytes are available"
    ):
        async with fake_runtime(ScriptedProbe(free_bytes=2 * KV), slots=6, unfit_slots="refuse"):
            pass


async def test_an_unknown_reading_never_shrinks() -> None:
    probe = ScriptedProbe(free_bytes=None)
    async with fake_runtime(probe, slots=4, resize_interval_s=0.01, resize_cooldown_s=0) as rt:
        await wait_until(lambda: probe.reads >= 5)
        status = rt.status()
    assert status.slots_effective == 4 and status.resizes == 0


async def test_auto_on_this_machine_reads_host_memory_and_the_cgroup_limit(tmp_path: Path) -> None:
    """The real host probe picks a count from free memory; a lower cgroup limit (written by the
    test into a cgroup v2 folder of its own) lowers it."""
    require_backend("llama_cpp")
    cfg = RuntimeConfig(
        slots="auto",
        max_slots=6,
        n_ctx_per_slot=1024,
        resize_interval_s=0.05,
        resize_cooldown_s=0,
        host_cache_bytes=0,  # the slots alone (a prompt cache would keep a tenth of the free memory)
    )
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("0\n")
    probe = CgroupHostProbe(tmp_path)
    async with Runtime(cfg, probe=probe) as rt:
        kv = rt.status().kv_bytes_per_slot
        start = rt.status()
        assert start.slots_effective == 6  # this machine has far more than 6 x 24 MiB free
        assert start.memory is None or start.memory.source == "host"
        limit = 3 * kv + cfg.memory_headroom_bytes + 20 * MiB
        (tmp_path / "memory.max").write_text(f"{limit}\n")
        (tmp_path / "memory.current").write_text(f"{6 * kv}\n")  # our own six slots' KV
        await wait_until(lambda: rt.status().slots_effective < 6, 20)
        low = rt.status()
    assert low.memory is not None and low.memory.source == "cgroup"
    assert low.slots_effective == max(1, (limit - 6 * kv + 6 * kv - cfg.memory_headroom_bytes) // kv) < 6


@pytest.mark.parametrize("kind", BACKENDS)
async def test_resize_under_load_keeps_every_request_exact(kind: str) -> None:
    """Grow 2 -> 4 and shrink 4 -> 2 while requests run: all complete, each output is token
    for token what it is without a resize, and the weights were never reloaded."""
    requests = [greedy(p, max_tokens=40) for p in PROMPTS[:6]]
    fake = {"step_delay_s": 0.003}
    async with open_runtime(kind, slots=4, prefix_cache=False, memory_source="none", fake=fake) as rt:
        await rt.resize(2)
        alone = [await rt.complete(r) for r in requests]
        results: list[Completion | None] = [None] * len(requests)

        async def run(i: int) -> None:
            results[i] = await rt.complete(requests[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(requests)):
                tg.start_soon(run, i)
            await wait_until(lambda: all(rt.backend.seq_cells(s) > 0 for s in (0, 1)))
            grow = await rt.resize(4)
            await wait_until(lambda: rt.status().slots_busy >= 3)
            shrink = await rt.resize(2)
        status = rt.status()
    assert grow is not None and (grow.from_slots, grow.to_slots, grow.reason) == (2, 4, "manual")
    assert shrink is not None and (shrink.from_slots, shrink.to_slots) == (4, 2)
    assert grow.carried_bytes > 0  # the two running sequences moved to the new context
    assert grow.pause_s > 0 and shrink.pause_s > 0
    for i, (a, b) in enumerate(zip(alone, results, strict=True)):
        assert b is not None and b.done_reason == a.done_reason, i
        assert b.token_ids == a.token_ids, f"request {i} changed across the resize"
    assert status.slots_effective == 2 and status.requests_failed == 0 and status.requests_cancelled == 0


async def test_a_resize_that_cannot_build_serves_on_at_the_old_count() -> None:
    """Growing past what fits (the fake refuses more than 2 sequences, as a GPU out of memory):
    the runtime serves on at 2, the requests running meanwhile are exact, the failure is in
    status(), and a memory-driven grow that fails never escapes the runtime's block."""
    cfg = RuntimeConfig(backend="fake", slots=2, n_ctx_per_slot=512, resize_interval_s=0)
    backend = FakeBackend(n_seq_max=2, n_ctx_per_slot=512, step_delay_s=0.002, resize_fails_above=2)
    registry = CollectorRegistry()
    async with Runtime(cfg, backend=backend, registry=registry) as rt:
        solo = await rt.complete(greedy(PROMPTS[0], max_tokens=40))
        running = rt.generate(greedy(PROMPTS[0], max_tokens=40))
        record = await rt.resize(4)
        during = await running.collect()
        after = await rt.complete(greedy(PROMPTS[1], max_tokens=5))
        status = rt.status()
    assert record is not None and record.error is not None and "resize_fails_above" in record.error
    assert (record.from_slots, record.to_slots) == (2, 2)
    assert during.token_ids == solo.token_ids and after.stats.completion_tokens == 5
    assert (status.state, status.slots_effective, status.slots_target) == ("ready", 2, 2)
    assert status.last_resize is not None and status.last_resize.error == record.error
    manual = {
        (direction, reason): registry.get_sample_value(
            "slotserve_resize_failures_total", {"model": "fake", "direction": direction, "reason": reason}
        )
        for direction in ("grow", "shrink")
        for reason in ("manual", "memory_available")
    }
    assert manual.pop(("grow", "manual")) == 1
    assert set(manual.values()) == {0.0}  # the other series exist, at 0
    grown = registry.get_sample_value(
        "slotserve_slot_resizes_total", {"model": "fake", "direction": "grow", "reason": "manual"}
    )
    assert grown == 0  # a failed resize is no change of the slot count

    probe = ScriptedProbe(free_bytes=64 * KV)  # room for 8: the watch tries to grow, and fails
    cfg = RuntimeConfig(
        backend="fake", slots="auto", min_slots=1, max_slots=8, resize_interval_s=0.01, resize_cooldown_s=0.05,
        **NO_HEADROOM,
    )  # fmt: skip
    registry = CollectorRegistry()
    backend = FakeBackend(n_seq_max=1, resize_fails_above=2)
    async with Runtime(cfg, backend=backend, probe=probe, registry=registry) as rt:
        await wait_until(lambda: rt.status().resizes >= 2, 10)
        served = await rt.complete(greedy("still serving", max_tokens=3))
        watched = rt.status()
        records = rt.statistics().supervisor.resizes  # read with the counters, no await between

        def failures(reason: str) -> float | None:
            labels = {"model": "fake", "direction": "grow", "reason": reason}
            return registry.get_sample_value("slotserve_resize_failures_total", labels)

        at_start, watching = failures("startup"), failures("memory_available")
    assert served.stats.completion_tokens == 3 and watched.state == "ready"
    assert watched.last_resize is not None and watched.last_resize.error is not None
    assert at_start == 1  # 8 fit in memory and the device built no context of 8: it started with 1
    assert watching == sum(1 for r in records if r.error is not None and r.reason == "memory_available") >= 2


async def test_llama_cpp_asked_for_an_impossible_context_serves_on() -> None:
    """llama.cpp refuses more than 256 sequences in a context: the old one serves on, with the
    cells of a finished prompt carried back (the next request reuses its prefix)."""
    require_backend("llama_cpp")
    async with open_runtime("llama_cpp", slots=1, n_ctx_per_slot=256) as rt:
        first = await rt.complete(greedy(PROMPTS[2], max_tokens=8))
        record = await rt.resize(300)
        again = await rt.complete(greedy(PROMPTS[2], max_tokens=8))
        status = rt.status()
    assert record is not None and record.error is not None and "300 x 256 tokens" in record.error
    assert (record.from_slots, record.to_slots) == (1, 1)
    assert again.token_ids == first.token_ids and again.stats.prompt_tokens_cached > 0
    assert (status.state, status.slots_effective) == ("ready", 1)
