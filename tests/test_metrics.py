"""Exact metric values after scripted loads on the fake backend, each on its own registry."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

import runtime.runtime
from runtime import (
    ContextOverflowError,
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
    Runtime,
    RuntimeClosedError,
    RuntimeConfig,
    RuntimeFailedError,
    SlotFailedError,
)
from runtime.backends import Backend
from runtime.backends.fake import FakeBackend
from runtime.core.telemetry import ScriptedProbe
from runtime.metrics import metrics_app
from tests.helpers import greedy, wait_until

HISTOGRAMS = (
    "slotserve_time_to_first_token_seconds",
    "slotserve_e2e_request_latency_seconds",
    "slotserve_request_queue_time_seconds",
    "slotserve_request_prefill_time_seconds",
    "slotserve_request_decode_time_seconds",
    "slotserve_request_prompt_tokens",
    "slotserve_request_generation_tokens",
)
"""The request histograms: one observation per completed request."""


@asynccontextmanager
async def fake_runtime(
    registry: CollectorRegistry, *, name: str = "fake", fake: dict[str, Any] | None = None, **config: Any
) -> AsyncIterator[Runtime]:
    """A ready Runtime on a FakeBackend called ``name``, with its metrics on ``registry``."""
    config.setdefault("n_ctx_per_slot", 256)
    probe = config.pop("probe", None)
    cfg = RuntimeConfig(backend="fake", **config)
    slots = cfg.slots if isinstance(cfg.slots, int) else cfg.max_slots
    backend = FakeBackend(n_seq_max=slots, n_ctx_per_slot=cfg.n_ctx_per_slot, **(fake or {}))
    backend.info = msgspec.structs.replace(backend.info, name=name)
    async with Runtime(cfg, backend=backend, registry=registry, probe=probe) as rt:
        yield rt


def value(registry: CollectorRegistry, name: str, model: str = "fake", **labels: str) -> float:
    """The sample ``name`` of ``model`` with ``labels``; fails if it does not exist."""
    found = registry.get_sample_value(name, {"model": model, **labels})
    assert found is not None, f"no sample {name} {labels} for model {model}"
    return found


async def test_counters_and_histograms_equal_what_was_sent() -> None:
    """6 requests of known prompt and max_tokens on 2 slots: every count is exact."""
    reg = CollectorRegistry()
    prompts = [f"prompt number {i} " * (i + 1) for i in range(6)]  # the fake: 1 token per byte
    max_tokens = [5 + 3 * i for i in range(6)]
    async with fake_runtime(reg, slots=2, prefix_cache=False) as rt:
        async with anyio.create_task_group() as tg:
            for p, m in zip(prompts, max_tokens, strict=True):
                tg.start_soon(rt.complete, greedy(p, max_tokens=m))
        model = rt.statistics().model
    prompt_tokens = sum(len(p.encode()) for p in prompts)
    generated = sum(max_tokens)
    assert value(reg, "slotserve_requests_total", outcome="completed", reason="length") == 6
    assert value(reg, "slotserve_requests_total", outcome="completed", reason="stop") == 0
    assert value(reg, "slotserve_prompt_tokens_total") == prompt_tokens
    assert value(reg, "slotserve_prompt_tokens_cached_total") == 0
    assert value(reg, "slotserve_generation_tokens_total") == generated
    for name in HISTOGRAMS:
        assert value(reg, f"{name}_count") == 6, name
    assert value(reg, "slotserve_request_prompt_tokens_sum") == prompt_tokens
    assert value(reg, "slotserve_request_generation_tokens_sum") == generated
    assert value(reg, "slotserve_request_generation_tokens_bucket", le="16.0") == 4  # 5, 8, 11, 14
    # one ITL per token after a request's first; the step counters agree with the ModelActor
    assert value(reg, "slotserve_inter_token_latency_seconds_count") == generated - 6
    assert value(reg, "slotserve_step_tokens_total", phase="prefill") == prompt_tokens
    assert value(reg, "slotserve_step_tokens_total", phase="decode") == generated - 6
    assert value(reg, "slotserve_steps_total") == model.steps
    assert value(reg, "slotserve_step_sequences_count") == model.steps
    assert value(reg, "slotserve_step_duration_seconds_count") == model.steps
    carried = sum(n * count for n, count in model.steps_by_sequences.items())
    assert value(reg, "slotserve_step_sequences_sum") == carried
    assert value(reg, "slotserve_step_sequences_bucket", le="2.0") == model.steps  # 2 slots at most


async def test_reused_prefix_tokens_are_counted() -> None:
    """The same prompt twice on one slot: the second reuses all but its last prompt token."""
    reg = CollectorRegistry()
    async with fake_runtime(reg, slots=1, prefix_cache=True) as rt:
        first = await rt.complete(greedy("a prompt to keep", max_tokens=4))
        second = await rt.complete(greedy("a prompt to keep", max_tokens=4))
    assert second.stats.prompt_tokens_cached == len("a prompt to keep") - 1
    assert value(reg, "slotserve_prompt_tokens_cached_total") == second.stats.prompt_tokens_cached
    assert value(reg, "slotserve_prompt_tokens_total") == 2 * first.stats.prompt_tokens
    computed = 2 * first.stats.prompt_tokens - second.stats.prompt_tokens_cached
    assert value(reg, "slotserve_step_tokens_total", phase="prefill") == computed


async def test_rejections_and_failures_are_counted_by_reason() -> None:
    """4 refused for a full mailbox, 1 invalid, 1 context overflow, 1 after closing."""
    reg = CollectorRegistry()
    async with fake_runtime(reg, slots=1, max_queue=1, max_tokens_cap=64, fake={"step_delay_s": 0.002}) as rt:
        streams, refused = [], 0
        for i in range(6):
            try:
                streams.append(rt.generate(greedy(f"request {i}", max_tokens=8)))
            except QueueFullError:
                refused += 1
        with pytest.raises(InvalidRequestError, match="max_tokens_cap"):
            rt.generate(greedy("too long", max_tokens=65))
        for s in streams:
            await s.collect()
        with pytest.raises(ContextOverflowError):
            await rt.complete(greedy("x" * 200, max_tokens=60))
    with pytest.raises(RuntimeClosedError):
        rt.generate(greedy("late"))
    assert refused == 4
    rejected = {r: value(reg, "slotserve_requests_total", outcome="rejected", reason=r) for r in
                ("queue_full", "invalid", "closed", "failed")}  # fmt: skip
    assert rejected == {"queue_full": 4, "invalid": 1, "closed": 1, "failed": 0}
    assert value(reg, "slotserve_requests_total", outcome="failed", reason="context_overflow") == 1
    assert value(reg, "slotserve_requests_total", outcome="completed", reason="length") == 2
    assert value(reg, "slotserve_e2e_request_latency_seconds_count") == 2  # completed ones only


async def test_gauges_return_to_idle_after_a_mass_cancel() -> None:
    """8 streams on 2 slots (2 busy, 6 queued), all cancelled: with no further traffic the
    queue and slot gauges read 0 at the next collection (vLLM once kept showing 100)."""
    reg = CollectorRegistry()
    async with fake_runtime(reg, slots=2, max_queue=8, fake={"step_delay_s": 0.005}) as rt:
        streams = [rt.generate(greedy(f"cancel me {i}", max_tokens=200)) for i in range(8)]
        for s in streams[:2]:
            await s.__anext__()  # both slots are decoding
        assert value(reg, "slotserve_slots_busy") == 2
        assert value(reg, "slotserve_queue_depth") == 6
        for s in streams:
            await s.aclose()
        cancelled = {"outcome": "cancelled", "reason": "cancel"}
        await wait_until(lambda: value(reg, "slotserve_requests_total", **cancelled) == 8)
        assert value(reg, "slotserve_slots_busy") == 0
        assert value(reg, "slotserve_queue_depth") == 0
        assert value(reg, "slotserve_time_to_first_token_seconds_count") == 0  # none completed
        assert value(reg, "slotserve_generation_tokens_total") >= 2  # the two that decoded
    assert reg.get_sample_value("slotserve_slots_busy", {"model": "fake"}) is None  # closed: no gauges


async def test_the_loading_state_and_a_failed_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the weights load the state reads loading, under the configured model's name; a
    start that failed leaves no gauges behind."""
    release = threading.Event()

    def slow_failing_load(config: RuntimeConfig, n_seq: int | None = None) -> Backend:
        release.wait(10)
        raise ModelLoadError("the weights could not be read")

    monkeypatch.setattr(runtime.runtime, "load_backend", slow_failing_load)
    reg = CollectorRegistry()
    rt = Runtime(RuntimeConfig(model="default"), registry=reg)

    async def enter() -> None:
        with pytest.raises(ModelLoadError):
            async with rt:
                pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(enter)
        await wait_until(
            lambda: reg.get_sample_value("slotserve_runtime_state", {"model": "default", "state": "loading"})
        )
        assert value(reg, "slotserve_runtime_state", "default", state="ready") == 0
        with pytest.raises(RuntimeClosedError):
            rt.generate(greedy("too early"))
        release.set()
    assert value(reg, "slotserve_requests_total", "default", outcome="rejected", reason="closed") == 1
    assert reg.get_sample_value("slotserve_runtime_state", {"model": "default", "state": "loading"}) is None


async def test_slot_and_runtime_gauges() -> None:
    """Slots, queue capacity, memory sizes and the runtime state read from status()."""
    reg = CollectorRegistry()
    fake = {"weights_bytes": 300 << 20, "kv_bytes_per_slot": 3 << 20}
    async with fake_runtime(reg, slots=3, max_queue=5, fake=fake) as rt:
        assert value(reg, "slotserve_runtime_state", state="ready") == 1
        assert value(reg, "slotserve_runtime_state", state="loading") == 0
        assert value(reg, "slotserve_runtime_state", state="failed") == 0
        for kind in ("configured", "effective", "target"):
            assert value(reg, f"slotserve_slots_{kind}") == 3
        assert value(reg, "slotserve_queue_capacity") == 5
        assert value(reg, "slotserve_model_weights_bytes") == 300 << 20
        assert value(reg, "slotserve_kv_cache_allocated_bytes") == 3 * (3 << 20)
        assert value(reg, "slotserve_model_load_duration_seconds") == rt.load_seconds
        await rt.complete(greedy("keep this prefix", max_tokens=3))
        # the whole conversation stays: the prompt and the answer's 3 tokens but the last
        assert value(reg, "slotserve_prefix_cache_tokens") == len("keep this prefix") + 2


async def test_restarts_failures_and_the_failed_state() -> None:
    """Two slot crashes with restart_intensity 1: one restart, then the runtime fails."""
    reg = CollectorRegistry()
    fake = {"fault_prompts": ["boom"]}
    async with fake_runtime(reg, slots=1, max_queue=4, restart_intensity=1, fake=fake) as rt:
        crashing = [rt.generate(greedy("boom", max_tokens=5)) for _ in range(2)]
        queued = rt.generate(greedy("fine", max_tokens=5))
        for s in crashing:
            with pytest.raises(SlotFailedError):
                await s.collect()
        with pytest.raises(RuntimeFailedError):
            await queued.collect()
        with pytest.raises(RuntimeFailedError):
            rt.generate(greedy("after"))
        assert value(reg, "slotserve_runtime_state", state="failed") == 1
        assert value(reg, "slotserve_runtime_state", state="ready") == 0
    assert value(reg, "slotserve_actor_restarts_total", actor="slot") == 2
    assert value(reg, "slotserve_actor_restarts_total", actor="model") == 0
    assert value(reg, "slotserve_requests_total", outcome="failed", reason="slot_failed") == 2
    assert value(reg, "slotserve_requests_total", outcome="failed", reason="runtime_failed") == 1
    assert value(reg, "slotserve_requests_total", outcome="rejected", reason="failed") == 1


async def test_resizes_are_counted_with_their_pause() -> None:
    """Growing 2 -> 3 and shrinking 3 -> 1 by hand: two resizes, two pauses, gauges follow."""
    reg = CollectorRegistry()
    async with fake_runtime(reg, slots=2, max_slots=4) as rt:
        await rt.resize(3)
        assert value(reg, "slotserve_slots_effective") == 3
        assert value(reg, "slotserve_slots_configured") == 2
        await rt.resize(1)
        assert value(reg, "slotserve_slots_effective") == 1
        assert value(reg, "slotserve_slots_target") == 1
    assert value(reg, "slotserve_slot_resizes_total", direction="grow", reason="manual") == 1
    assert value(reg, "slotserve_slot_resizes_total", direction="shrink", reason="manual") == 1
    assert value(reg, "slotserve_slot_resizes_total", direction="shrink", reason="memory_low") == 0
    assert value(reg, "slotserve_resize_pause_seconds_count") == 2


async def test_device_memory_is_the_supervisors_last_reading() -> None:
    reg = CollectorRegistry()
    probe = ScriptedProbe(free_bytes=6 << 30, total_bytes=16 << 30)
    fixed: dict[str, Any] = {"slots": 2, "min_slots": 2, "max_slots": 2}
    async with fake_runtime(reg, resize_interval_s=0.01, probe=probe, **fixed) as rt:
        await wait_until(lambda: rt.status().memory is not None)
        assert value(reg, "slotserve_device_memory_free_bytes", device="scripted") == 6 << 30
        assert value(reg, "slotserve_device_memory_total_bytes", device="scripted") == 16 << 30
        probe.free_bytes = 5 << 30
        await wait_until(lambda: getattr(rt.status().memory, "free_bytes", None) == 5 << 30)
        assert value(reg, "slotserve_device_memory_free_bytes", device="scripted") == 5 << 30


async def test_two_runtimes_share_a_registry_without_clashing() -> None:
    """Two models and a host's own metric on one registry; two runtimes of one model add up."""
    reg = CollectorRegistry()
    host = Counter("host_requests", "the host application's own counter", registry=reg)
    host.inc(7)
    async with (
        fake_runtime(reg, name="model-a", slots=2) as a,
        fake_runtime(reg, name="model-b", slots=3) as b,
    ):
        await a.complete(greedy("for a", max_tokens=4))
        await b.complete(greedy("for b", max_tokens=6))
        assert value(reg, "slotserve_slots_effective", "model-a") == 2
        assert value(reg, "slotserve_slots_effective", "model-b") == 3
        async with fake_runtime(reg, name="model-a", slots=1) as a2:
            await a2.complete(greedy("for a again", max_tokens=5))
            assert value(reg, "slotserve_slots_effective", "model-a") == 3  # 2 + 1
    assert value(reg, "slotserve_generation_tokens_total", "model-a") == 9
    assert value(reg, "slotserve_generation_tokens_total", "model-b") == 6
    assert reg.get_sample_value("host_requests_total") == 7
    # the same registry again, after they closed (tests open many runtimes in one process)
    async with fake_runtime(reg, name="model-a", slots=2) as again:
        await again.complete(greedy("once more", max_tokens=2))
    assert value(reg, "slotserve_requests_total", "model-a", outcome="completed", reason="length") == 3


async def test_a_clashing_metric_on_the_registry_is_refused() -> None:
    reg = CollectorRegistry()
    Gauge("slotserve_queue_depth", "the host's own gauge of that name", registry=reg)
    with pytest.raises(ValueError, match="slotserve_queue_depth"):
        async with fake_runtime(reg):
            pass


async def test_metrics_app_serves_the_registry() -> None:
    reg = CollectorRegistry()
    async with fake_runtime(reg, slots=2) as rt:
        await rt.complete(greedy("hello", max_tokens=3))
        transport = httpx.ASGITransport(app=metrics_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://slotserve") as client:
            response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert 'slotserve_slots_effective{model="fake"} 2.0' in lines
    assert 'slotserve_generation_tokens_total{model="fake"} 3.0' in lines
