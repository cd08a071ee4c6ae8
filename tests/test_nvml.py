"""GPU memory through a scripted NVML (tests/fake_nvml.py): the GPUs that hold the model, read
per device; slots sized and resized live from it; a failing call read as unknown, never zero."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runtime import ConfigError, Runtime, RuntimeConfig
from runtime.backends.fake import FakeBackend
from runtime.core.nvml import NvmlProbe, visible_gpus
from runtime.core.placement import kv_shares
from runtime.core.records import DeviceMemory
from tests.fake_nvml import FakeGpu, FakeNvml, GiB
from tests.helpers import PROMPTS, complete_all, greedy, wait_until


def gpu_backend(**options: Any) -> FakeBackend:
    """A fake model on the GPU (all its layers), 1 GiB of weights and of KV per slot."""
    options = {"n_seq_max": 1, "gpu_layers": 33, "weights_bytes": GiB, "kv_bytes_per_slot": GiB, **options}
    return FakeBackend(**options)


def device_samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """(family, device) -> value of every device-labelled sample, parsed from the exposition text."""
    text = generate_latest(registry).decode()
    return {
        (s.name, s.labels["device"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "device" in s.labels
    }


def holding(backend: FakeBackend) -> Any:
    """What the runtime holds on its GPU now: the weights and the KV of its current context."""
    return lambda: backend.info.weights_bytes + backend.info.n_seq_max * backend.info.kv_bytes_per_slot


# -- which GPUs ------------------------------------------------------------------------------


def test_cuda_visible_devices_maps_cudas_gpus_to_nvmls() -> None:
    assert visible_gpus(None, 3) == [0, 1, 2]
    assert visible_gpus("2,0", 4) == [2, 0]
    assert visible_gpus("1, 7, 0", 4) == [1]  # 7 does not exist: CUDA stops there
    assert visible_gpus("0,0,1", 4) == [0]  # a repeat is invalid too
    assert visible_gpus("GPU-8f3a,1", 2) == ["GPU-8f3a", 1]
    assert visible_gpus("", 4) == [] and visible_gpus("-1", 4) == []


def test_the_gpus_that_hold_the_kv_cache_as_llama_cpp_places_it() -> None:
    assert kv_shares("none", 1, (), 4) == {1: 1.0}
    assert kv_shares("layer", 0, (), 2) == {0: 0.5, 1: 0.5}
    assert kv_shares("layer", 0, (3.0, 1.0), 4) == {0: 0.75, 1: 0.25}
    assert kv_shares("layer", 0, (0.0, 2.0, 2.0), 2) == {1: 1.0}  # the third is not visible
    assert kv_shares("layer", 0, (0.0, 0.0, 5.0), 2) == {0: 0.5, 1: 0.5}  # none visible: the default
    assert kv_shares("row", 2, (1.0, 1.0), 3) == {0: 0.0, 1: 0.0, 2: 1.0}  # weights rows; KV on main
    assert kv_shares("layer", 0, (), 0) == {}


@given(
    st.sampled_from(["none", "layer", "row"]),
    st.integers(0, 15),
    st.lists(st.floats(0, 100), max_size=16),
    st.integers(0, 16),
)
def test_kv_shares_sum_to_one_over_visible_gpus(
    mode: Any, main: int, split: list[float], visible: int
) -> None:
    shares = kv_shares(mode, main, split, visible)
    assert list(shares) == sorted(shares)
    assert all(gpu < visible or gpu == main for gpu in shares)
    if shares:
        assert sum(shares.values()) == pytest.approx(1.0)
    else:
        assert mode == "layer" and visible == 0


def test_tensor_split_is_read_from_the_environment_and_refused_when_malformed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLOTSERVE_TENSOR_SPLIT", "3,1")
    monkeypatch.setenv("SLOTSERVE_SPLIT_MODE", "row")
    cfg = RuntimeConfig.load()
    assert (cfg.tensor_shares, cfg.split_mode, cfg.main_gpu) == ((3.0, 1.0), "row", 0)
    with pytest.raises(ConfigError, match=r"tensor_split is '3,x'; it must be up to 16 comma-separated"):
        RuntimeConfig(tensor_split="3,x")
    with pytest.raises(ConfigError, match="tensor_split is '0,0'"):
        RuntimeConfig(tensor_split="0,0")
    with pytest.raises(ConfigError, match="main_gpu is 16; it must be between 0 and 15"):
        RuntimeConfig(main_gpu=16)


def test_cuda_visible_devices_picks_the_nvml_device_by_index_or_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [FakeGpu(name=f"card {i}", uuid=f"GPU-{i}{i}{i}-uuid", others_bytes=i * GiB) for i in range(3)]
    FakeNvml(*gpus).install(monkeypatch)
    by_index = NvmlProbe(main_gpu=0, cuda_visible_devices="2").read()
    assert by_index is not None and by_index.devices[0].name == "card 2"
    assert (by_index.device, by_index.free_bytes) == ("gpu0", 78 * GiB)  # CUDA's gpu0 is NVML's 2
    by_uuid = NvmlProbe(split_mode="layer", cuda_visible_devices="GPU-111,GPU-000-uuid").read()
    assert by_uuid is not None
    assert [(d.device, d.name) for d in by_uuid.devices] == [("gpu0", "card 1"), ("gpu1", "card 0")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # read when the probe is made
    from_env = NvmlProbe.for_config(RuntimeConfig(split_mode="none")).read()
    assert from_env is not None and from_env.devices[0].name == "card 1"


# -- sizing from the GPU ---------------------------------------------------------------------


async def test_auto_sizes_the_slots_from_the_gpus_free_memory(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The way a GPU user gets it: memory_source auto, layers on the GPU -> NVML of the model's GPU."""
    backend = gpu_backend()
    gpu = FakeGpu(total_bytes=80 * GiB, others_bytes=60 * GiB, holds=holding(backend))
    FakeNvml(gpu).install(monkeypatch)
    cfg = RuntimeConfig(backend="fake", slots="auto", max_slots=32, resize_interval_s=0)
    with caplog.at_level(logging.INFO, logger="slotserve"):
        async with Runtime(cfg, backend=backend, registry=CollectorRegistry()) as rt:
            status = rt.status()
    # free at start: 80 - 60 - 1 (weights) - 1 (the 1-slot context) = 18 GiB; headroom 8 GiB (10%)
    assert status.memory is not None and status.memory.devices == (
        DeviceMemory(device="gpu0", name="NVIDIA H200", total_bytes=80 * GiB, used_bytes=62 * GiB,
                     free_bytes=18 * GiB, kv_share=1.0),
    )  # fmt: skip
    assert (status.slots_auto, status.slots_effective) == (True, 11)  # (18 + 1 - 8) GiB / 1 GiB
    assert status.memory.source == "nvml" and backend.resizes == [11]
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready:")]
    assert ready and ready[0].endswith("gpu0 (NVIDIA H200): 18.00 GiB free of 80.00 GiB")


async def test_live_shrink_and_grow_under_load_follow_the_gpu_and_change_no_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Others take GPU memory while requests run: the slots shrink 4 -> 2; they free more: the
    slots grow 2 -> 5. Every answer is token for token what it is without a resize (greedy)."""
    requests = [greedy(p, max_tokens=60) for p in PROMPTS + PROMPTS[:4]]
    steady = RuntimeConfig(backend="fake", slots=4, memory_source="none", prefix_cache=False)
    fixed = FakeBackend(n_seq_max=4, step_delay_s=0.002)
    async with Runtime(steady, backend=fixed, registry=CollectorRegistry()) as rt:
        unresized = await complete_all(rt, requests)

    backend = gpu_backend(step_delay_s=0.002)
    gpu = FakeGpu(total_bytes=24 * GiB, others_bytes=17 * GiB, holds=holding(backend))
    FakeNvml(gpu).install(monkeypatch)
    cfg = RuntimeConfig(
        backend="fake", slots="auto", max_slots=8, prefix_cache=False, memory_headroom_fraction=0.0,
        memory_headroom_bytes=2 * GiB, resize_interval_s=0.01, resize_cooldown_s=0.05,
    )  # fmt: skip
    async with Runtime(cfg, backend=backend, registry=CollectorRegistry()) as rt:
        assert rt.status().slots_effective == 4  # 24 - 17 - 1 - 1 = 5 GiB free, + 1 held, - 2 headroom
        results: list[Any] = []

        def free_now() -> int | None:
            memory = rt.status().memory
            return None if memory is None else memory.free_bytes

        async def run_all() -> None:
            results.extend(await complete_all(rt, requests))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_all)
            await wait_until(lambda: rt.status().slots_busy == 4)
            gpu.others_bytes = 19 * GiB  # the GPU is full: 0 free, under the 2 GiB headroom
            await wait_until(lambda: rt.status().slots_effective == 2)
            await wait_until(lambda: free_now() == 2 * GiB)  # read again at 2 slots: 24 - 19 - 1 - 2
            gpu.others_bytes = 15 * GiB  # 6 GiB free at 2 slots: 5 fit with half a slot to spare
            await wait_until(lambda: rt.status().slots_effective == 5)
            await wait_until(lambda: free_now() == 3 * GiB)  # 24 - 15 - 1 - 5
        resizes = rt.statistics().supervisor.resizes
        failed = rt.status().requests_failed
    steps = [(r.from_slots, r.to_slots, r.reason) for r in resizes]
    assert steps == [(4, 2, "memory_low"), (2, 5, "memory_available")]
    assert resizes[0].drain_s > 0 and resizes[1].carried_bytes > 0  # both under load
    assert len(results) == len(requests) and failed == 0
    assert [r.token_ids for r in results] == [r.token_ids for r in unresized]
    assert [r.done_reason for r in results] == ["length"] * len(requests)


# -- unknown, never zero ---------------------------------------------------------------------


def test_nvml_that_cannot_start_reads_as_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(FakeGpu(), init_fails=True).install(monkeypatch)
    probe = NvmlProbe()
    assert probe.read() is None and probe.read() is None  # tried again, logged once
    nvml.init_fails = False
    reading = probe.read()
    assert reading is not None and reading.free_bytes == 80 * GiB and nvml.inits == 1


async def test_a_failing_gpu_reads_as_unknown_and_the_other_as_itself(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Split over two GPUs; the second's memory call fails: it reads as unknown (no figure, no
    metric sample), the first still reads, and the slot count stays; once it reads again, the
    tighter GPU bounds the slots."""
    gpus = FakeGpu(others_bytes=30 * GiB), FakeGpu(name="NVIDIA H100", others_bytes=40 * GiB, failing=True)
    FakeNvml(*gpus).install(monkeypatch)
    registry = CollectorRegistry()
    cfg = RuntimeConfig(
        backend="fake", slots="auto", min_slots=2, max_slots=8, resize_interval_s=0.01, resize_cooldown_s=0
    )
    with caplog.at_level(logging.WARNING, logger="slotserve.telemetry"):
        async with Runtime(cfg, backend=gpu_backend(), registry=registry) as rt:
            await wait_until(lambda: gpus[0].reads >= 3)  # the start, and the watch twice
            unknown = rt.status()
            samples = device_samples(registry)
            gpus[1].failing = False
            await wait_until(lambda: rt.status().slots_effective == 8)
            known = rt.status()
    assert unknown.memory is not None
    assert [(d.device, d.free_bytes, d.total_bytes, d.used_bytes) for d in unknown.memory.devices] == [
        ("gpu0", 50 * GiB, 80 * GiB, 30 * GiB), ("gpu1", None, None, None),
    ]  # fmt: skip
    assert (unknown.memory.device, unknown.memory.free_bytes) == ("gpu1", None)
    assert (unknown.slots_effective, unknown.resizes) == (2, 0)  # min_slots, never resized on an unknown
    assert samples[("slotserve_device_memory_free_bytes", "gpu0")] == 50 * GiB
    assert {device for _, device in samples} == {"gpu0"}  # gpu1: no sample rather than 0
    failures = [r for r in caplog.records if r.getMessage().startswith("gpu1 memory (NVML) cannot be read")]
    assert len(failures) == 1  # logged once, however often it fails
    assert known.memory is not None and known.memory.device == "gpu1"  # 40 GiB free < 50 GiB
    assert known.memory.free_bytes == 2 * 40 * GiB  # each GPU holds half of each slot's KV
    assert known.last_resize is not None and known.last_resize.reason == "memory_available"


# -- per device in status() and the metrics --------------------------------------------------


async def test_two_gpus_are_reported_with_their_labels_in_status_and_the_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = (
        FakeGpu(others_bytes=20 * GiB),
        FakeGpu(name="NVIDIA H200 NVL", total_bytes=140 * GiB, others_bytes=100 * GiB),
    )
    FakeNvml(*gpus).install(monkeypatch)
    registry = CollectorRegistry()
    cfg = RuntimeConfig(backend="fake", slots=2, tensor_split="3,1", resize_interval_s=0.01)
    async with Runtime(cfg, backend=gpu_backend(n_seq_max=2), registry=registry) as rt:
        await wait_until(lambda: gpus[0].reads >= 2)
        status = rt.status()
        samples = device_samples(registry)
    assert status.memory is not None
    assert status.memory.devices == (
        DeviceMemory(device="gpu0", name="NVIDIA H200", total_bytes=80 * GiB, used_bytes=20 * GiB,
                     free_bytes=60 * GiB, kv_share=0.75),
        DeviceMemory(device="gpu1", name="NVIDIA H200 NVL", total_bytes=140 * GiB, used_bytes=100 * GiB,
                     free_bytes=40 * GiB, kv_share=0.25),
    )  # fmt: skip
    # gpu0 holds three quarters of each slot: 60 / 0.75 = 80 GiB < gpu1's 40 / 0.25 = 160 GiB
    assert (status.memory.device, status.memory.free_bytes, status.memory.total_bytes) == (
        "gpu0", 80 * GiB, 80 * GiB * 4 // 3,
    )  # fmt: skip
    assert samples == {
        (f"slotserve_device_memory_{kind}_bytes", device): gib * GiB
        for device, figures in (("gpu0", (60, 20, 80)), ("gpu1", (40, 100, 140)))
        for kind, gib in zip(("free", "used", "total"), figures, strict=True)
    }
