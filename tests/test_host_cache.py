"""The host-RAM prompt cache (actors.host_cache), alone, and in the runtime on the fake and llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.host_cache import HostPromptCache
from actors.placement import common_prefix
from runtime import Runtime, RuntimeConfig
from runtime.backends.fake import FakeBackend
from runtime.bench.host_cache import run_host_cache
from runtime.core.sizing import host_cache_bound
from runtime.core.telemetry import CgroupHostProbe, ScriptedProbe
from tests.helpers import greedy, open_runtime, require_backend

GiB = 1 << 30

keys = st.lists(st.integers(0, 3), min_size=1, max_size=10)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), keys, st.integers(0, 60)),
        st.tuples(st.just("find"), keys, st.just(0)),
        st.tuples(st.just("bound"), st.just([0]), st.integers(0, 200)),
    ),
    max_size=40,
)


@given(bound=st.integers(0, 200), steps=ops)
def test_bytes_never_exceed_the_bound_and_the_lookup_is_the_longest_prefix(
    bound: int, steps: list[tuple[str, list[int], int]]
) -> None:
    cache = HostPromptCache(bound)
    for op, tokens, n in steps:
        if op == "put":
            kept = cache.put(tokens, bytes(n))
            assert kept == (n <= cache.bound_bytes)
            if kept:
                assert tokens in cache
        elif op == "bound":
            cache.set_bound(n)
        else:
            found = cache.longest_prefix(tokens)
            best = max((common_prefix(k, tokens) for k in cache._entries), default=0)
            if best == 0:
                assert found is None
            else:
                assert found is not None and found[1] == best == common_prefix(found[0], tokens)
        assert cache.held_bytes <= cache.bound_bytes
        assert cache.held_bytes == sum(len(v) for v in cache._entries.values())


def test_the_least_recently_used_goes_first_and_a_longer_conversation_replaces_its_prefix() -> None:
    cache = HostPromptCache(30)
    cache.put([1, 2], bytes(10))
    cache.put([3, 4], bytes(10))
    cache.take((1, 2), 2)  # [1, 2] is now the most recently used
    cache.put([5], bytes(10))
    cache.put([6], bytes(10))  # room for three: [3, 4] goes
    assert [3, 4] not in cache and [1, 2] in cache
    cache.put([1, 2, 7], bytes(5))  # serves every prompt [1, 2] did
    assert [1, 2] not in cache and cache.held_bytes == 25
    assert not cache.put([9], bytes(31))  # bigger than the bound: not kept
    stats = cache.statistics()
    assert (stats.hits, stats.tokens_saved, stats.evictions, stats.entries) == (1, 2, 1, 3)


PROMPTS = [chr(65 + i) * 200 + f" is prompt number {i:02d}, a story of its own." for i in range(16)]


async def two_passes(rt: Runtime) -> tuple[list[int], list[str], list[int]]:
    """The 16 prompts one after another, twice: each request's prompt tokens evaluated (not from
    cells), the answers, and the cache's bytes after each request."""
    evaluated, answers, held = [], [], []
    for prompt in PROMPTS + PROMPTS:
        done = await rt.complete(greedy(prompt, max_tokens=8))
        evaluated.append(done.stats.prompt_tokens - done.stats.prompt_tokens_cached)
        answers.append(done.text)
        cache = rt.statistics().model.host_cache
        held.append(-1 if cache is None else cache.held_bytes)
    return evaluated, answers, held


async def test_the_second_pass_of_16_prompts_through_2_slots_evaluates_far_fewer_tokens() -> None:
    async with open_runtime("fake", slots=2, memory_source="none", host_cache_bytes=1 << 20) as rt:
        evaluated, answers, held = await two_passes(rt)
        stats = rt.statistics().model.host_cache
    first, second = sum(evaluated[:16]), sum(evaluated[16:])
    assert first == sum(len(p) for p in PROMPTS)  # one token a byte; nothing shared
    assert second <= 16  # each evaluates its last prompt token only
    assert stats is not None and stats.hits == 16 and stats.tokens_saved == first - second
    assert max(held) <= 1 << 20
    async with open_runtime("fake", slots=2, memory_source="none", host_cache_bytes=0) as rt:
        plain_evaluated, plain, _ = await two_passes(rt)
        assert rt.statistics().model.host_cache is None
    assert answers == plain  # greedy: exactly the answers without the cache
    assert sum(plain_evaluated[16:]) == first  # without it the second pass evaluates it all again


async def test_a_tight_bound_keeps_the_cache_under_it_and_evicts() -> None:
    entry = 16 * (len(PROMPTS[0]) + 8)  # the fake's state: two int64 per cell, a prompt and its answer
    bound = 3 * entry
    async with open_runtime("fake", slots=2, memory_source="none", host_cache_bytes=bound) as rt:
        evaluated, _, held = await two_passes(rt)
        stats = rt.statistics().model.host_cache
    assert stats is not None and stats.evictions > 0 and stats.entries <= 3
    assert max(held) <= bound and max(held) > 0
    assert sum(evaluated[16:]) > sum(evaluated[:16]) // 2  # LRU over 14 saved, 3 kept: mostly misses


def test_the_default_bound_is_a_tenth_of_free_host_memory_and_a_cgroup_limit_lowers_it(
    tmp_path: Path,
) -> None:
    auto = RuntimeConfig(backend="fake")
    assert host_cache_bound(auto, ScriptedProbe(8 * GiB).read(), None) == int(0.8 * GiB)
    assert (
        host_cache_bound(
            RuntimeConfig(backend="fake", host_cache_bytes=0), ScriptedProbe(8 * GiB).read(), None
        )
        == 0
    )
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "memory.max").write_text(f"{2 * GiB}\n")
    (root / "memory.current").write_text(f"{GiB}\n")
    own = tmp_path / "self-cgroup"
    own.write_text("0::/\n")
    assert host_cache_bound(auto, None, CgroupHostProbe(root, own)) == int(0.1 * GiB)


async def test_a_scripted_limit_lowers_the_bound_and_the_slots_do_not_grow_into_it() -> None:
    probe = ScriptedProbe(free_bytes=4 * GiB, total_bytes=8 * GiB)
    kv = 256 << 20
    config: dict[str, Any] = {
        "slots": "auto", "min_slots": 1, "max_slots": 64, "resize_interval_s": 0.01, "resize_cooldown_s": 0,
        "memory_headroom_bytes": 0, "memory_headroom_fraction": 0,
    }  # fmt: skip
    for cache_bytes, slots in ((0, 17), (GiB, 13)):
        cfg = RuntimeConfig(backend="fake", host_cache_bytes=cache_bytes, **config)
        backend = FakeBackend(n_seq_max=1, kv_bytes_per_slot=kv)
        async with Runtime(cfg, backend=backend, probe=probe) as rt:
            # 4 GiB free and the first slot's, less the cache's 1 GiB
            assert rt.status().slots_effective == slots
    # The bound by default: a tenth of what 8 slots leave of 4 GiB (the first slot's is there).
    cfg = RuntimeConfig(backend="fake", **{**config, "max_slots": 8})
    auto = int((4 * GiB - 7 * kv) * 0.1)
    async with Runtime(cfg, backend=FakeBackend(n_seq_max=1, kv_bytes_per_slot=kv), probe=probe) as rt:
        assert rt.status().slots_effective == 8
        cache = rt.statistics().model.host_cache
        assert cache is not None and cache.bound_bytes == auto
        probe.free_bytes = GiB  # a tight limit now
        for _ in range(2000):
            if (c := rt.statistics().model.host_cache) is not None and c.bound_bytes < auto:
                break
            await anyio.sleep(0.005)
        cache = rt.statistics().model.host_cache
        assert cache is not None and cache.bound_bytes <= int(0.1 * GiB) + 1
        probe.free_bytes = 4 * GiB  # the limit loosened again: the bound comes back to where it began
        for _ in range(2000):
            if (c := rt.statistics().model.host_cache) is not None and c.bound_bytes == auto:
                break
            await anyio.sleep(0.005)
        cache = rt.statistics().model.host_cache
        assert cache is not None and cache.bound_bytes == auto


@pytest.mark.timeout(600)
async def test_llama_cpp_restores_saved_prompts_and_reports_equal_answers() -> None:
    """8 prompts through 2 slots twice on the embedded model: the second pass restores each
    from the cache; how many greedy answers equal those without the cache is printed (llama.cpp's
    chunking can differ: README)."""
    require_backend("llama_cpp")
    prompts = [f"Story {i}: " + f"the {chr(97 + i)} word goes on and on. " * 12 for i in range(8)]
    runs: dict[int, tuple[list[int], list[str]]] = {}
    for cache_bytes in (256 << 20, 0):
        async with open_runtime("llama_cpp", slots=2, n_ctx_per_slot=512, memory_source="none",
                                host_cache_bytes=cache_bytes) as rt:  # fmt: skip
            evaluated, answers = [], []
            for prompt in prompts + prompts:
                done = await rt.complete(greedy(prompt, max_tokens=4))
                evaluated.append(done.stats.prompt_tokens - done.stats.prompt_tokens_cached)
                answers.append(done.text)
            runs[cache_bytes] = (evaluated, answers)
            stats = rt.statistics().model.host_cache
            if cache_bytes:
                assert stats is not None and stats.hits == 8 and 0 < stats.held_bytes <= cache_bytes
    (evaluated, answers), (plain_evaluated, plain) = runs[256 << 20], runs[0]
    assert sum(evaluated[8:]) <= 8  # each evaluates its last prompt token only
    assert sum(plain_evaluated[8:]) > 0.9 * sum(plain_evaluated[:8])  # a few BOS-like tokens shared
    same = sum(a == b for a, b in zip(answers, plain, strict=True))
    print(f"llama.cpp greedy answers equal with and without the host cache: {same}/16")
    assert answers[:8] == plain[:8]  # the first pass restores nothing


async def test_the_benchmark_reports_both_passes_on_the_fake() -> None:
    r = await run_host_cache("fake", prompts=4, repeat=4, max_tokens=4)
    assert (
        r["on_pass1_evaluated_tokens"] == r["off_pass1_evaluated_tokens"] == r["off_pass2_evaluated_tokens"]
    )
    assert r["on_pass2_evaluated_tokens"] == 4 and r["hits"] == 4
    assert r["answers_equal"] == r["answers"] == 8
