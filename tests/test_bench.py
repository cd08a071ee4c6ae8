"""``slotserve bench``: each section runs in a tiny configuration and reports what it measured.

These check the figures' shape and sense (token counts, positive times), never their speed:
benchmarks are not timed tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import pytest

from runtime.bench.dispatch import measure_dispatch
from runtime.bench.options import SECTIONS, BenchOptions
from runtime.bench.servers import measure_servers
from runtime.bench.workload import PassFigures, Workload, percentile, prompts
from tests.helpers import require_backend, require_modules

ROOT = Path(__file__).resolve().parent.parent
TINY = Workload(max_tokens=4, n_ctx_per_slot=128, repeats=1)
SERVER_EXTRAS = ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


def _check_pass(f: PassFigures, n: int, max_tokens: int) -> None:
    assert f.n == n
    assert 0 < f.completion_tokens <= n * max_tokens
    assert f.wall_s > 0 and f.tokens_per_s == pytest.approx(f.completion_tokens / f.wall_s)
    assert len(f.ttft_s) == n and all(t > 0 for t in f.ttft_s)
    assert 0 < f.ttft_p50_s <= f.ttft_p99_s
    assert 0 < f.itl_p50_s <= f.itl_p99_s


def test_prompts_are_distinct_and_tagged() -> None:
    texts = prompts(20, tag="Round 1. ")
    assert len(set(texts)) == 20
    assert all(t.startswith("Round 1. ") for t in texts)


def test_percentile_and_pass_figures() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
    f = PassFigures.of(2, 10, 2.0, [0.5, 0.1], [0.2] * 8)
    assert f.tokens_per_s == 5.0
    assert f.ttft_s == [0.1, 0.5]
    assert f.itl_p99_s == pytest.approx(0.2)


async def test_dispatch_section_carries_every_token() -> None:
    figures = await measure_dispatch(slots=4, max_tokens=40, passes=2)
    assert figures.tokens_per_pass == 4 * 40  # the fake never ends early: every token came through
    assert figures.tokens_per_s > 0 and figures.us_per_token == pytest.approx(1e6 / figures.tokens_per_s)
    assert 0 < figures.fake_step_share < 1
    assert figures.tokens_per_s_without_fake > figures.tokens_per_s
    assert figures.steps_per_s > 0 and figures.cpu_per_wall > 0 and figures.tokens_per_cpu_s > 0
    assert len(figures.all_tokens_per_s) == 2
    # the floor is measured, not assumed: in the tests' debug-mode event loop the step loop's
    # bulk hand-off on its own thread can beat a hand-off per token on one loop
    assert figures.floor_tokens_per_s > 0 and figures.share_of_floor > 0


def test_bench_command_writes_json_and_png(tmp_path: Path) -> None:
    require_modules("matplotlib")
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "bench", "--sections", "4", "--repeats", "1",
         "--dispatch-tokens", "30", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "section 4: dispatch overhead" in proc.stdout and "fake backend tok/s" in proc.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["sections"] == ["dispatch"]
    assert data["machine"]["cores"] >= 1
    assert data["dispatch"]["tokens_per_pass"] == 8 * 30
    assert data["dispatch"]["tokens_per_s"] > 0
    assert "batching" not in data and "servers" not in data
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = subprocess.run(
        [sys.executable, "-m", "runtime.bench.report", str(tmp_path / "bench.json"), "--markdown"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert table.startswith("| N | plain loop tok/s |")
    assert f"Dispatch: {data['dispatch']['tokens_per_s']:,.0f} tok/s" in table


def test_sections_are_chosen_by_name_or_number() -> None:
    from runtime.bench.options import _sections

    assert _sections("all") == SECTIONS
    assert _sections("4,1") == ("plain", "dispatch")
    assert _sections("memory,embedded") == ("embedded", "memory")
    assert BenchOptions().n_list == (1, 2, 4, 8)


@pytest.mark.slow
async def test_plain_loop_and_embedded_api_side_by_side() -> None:
    require_backend("llama_cpp")
    from runtime.bench.batching import measure_batching

    rows = await measure_batching(TINY, (1, 2))
    assert [r.n for r in rows] == [1, 2]
    for row in rows:
        assert row.plain is not None and row.slotserve is not None
        _check_pass(row.plain, row.n, TINY.max_tokens)
        _check_pass(row.slotserve, row.n, TINY.max_tokens)
        assert row.ratio == pytest.approx(row.round_ratios[0])  # one round: its ratio
        assert len(row.round_ratios) == 1
        assert row.kv_bytes_per_slot > 0
        assert row.memory_source is not None and row.memory_source.startswith("host")
    assert rows[0].same_tokens == 1.0  # one sequence: the same batches, so the same greedy tokens


@pytest.mark.slow
async def test_servers_section_against_llama_cpp_python_server(tmp_path: Path) -> None:
    require_backend("llama_cpp")
    require_modules(*SERVER_EXTRAS)  # llama-cpp-python's server needs them
    figures = await measure_servers(TINY, clients=2, requests_per_client=1, log_dir=tmp_path)
    servers = (figures.llama_cpp_server, figures.llama_cpp_server_defaults, figures.slotserve_server)
    for f in servers:
        assert f.n == 2
        assert 0 < f.completion_tokens <= 2 * TINY.max_tokens
        assert 0 < f.ttft_p50_s <= f.ttft_p99_s and f.tokens_per_s > 0
    assert figures.ratio == pytest.approx(
        figures.slotserve_server.tokens_per_s / figures.llama_cpp_server.tokens_per_s
    )
    assert figures.ratio_defaults == pytest.approx(
        figures.slotserve_server.tokens_per_s / figures.llama_cpp_server_defaults.tokens_per_s
    )
    for name in ("llama_cpp_server", "llama_cpp_server_defaults", "slotserve_server"):
        assert (tmp_path / f"{name}.log").stat().st_size > 0


@pytest.mark.slow
def test_memory_section_reports_the_estimate_and_the_measure() -> None:
    require_backend("llama_cpp")
    from runtime.bench.memory import measure_memory

    result = measure_memory((1,))
    (row,) = result["rows"]
    assert row["slots"] == 1
    assert row["estimate_bytes"] == row["weights_bytes"] + row["kv_bytes_per_slot"] + row["compute_bytes"]
    assert row["weights_bytes"] > 0 and row["measured_bytes"] > 0
    assert result["four_slots_one_process"]["rss_bytes"] < result["four_processes_one_slot"]["rss_bytes"]
    assert {r["to"] for r in result["resizes"]} == {8, 4}
    kv = result["kv_cache_types"]
    assert kv["q4_0"]["kv_bytes_per_slot"] < kv["q8_0"]["kv_bytes_per_slot"] < kv["f16"]["kv_bytes_per_slot"]


def test_targets_and_the_batching_limit_are_read_from_the_result() -> None:
    from runtime.bench.report import batching_limit, targets

    def figures(tok_s: float) -> dict[str, float]:
        return {"tokens_per_s": tok_s}

    result = {
        "batching": [{"n": 4, "plain": figures(140.0), "slotserve": figures(133.0), "ratio": 0.95}],
        "servers": {"clients": 4, "llama_cpp_server": figures(70.0), "ratio": 1.9, "ratio_defaults": 3.0},
        "dispatch": {"tokens_per_s": 40_000.0},
    }
    assert batching_limit(result) == 2.0
    assert [(measured, met) for _, measured, _, _, met in targets(result)] == [
        (0.95, True),
        (1.9, False),
        (3.0, True),
        (40_000.0, False),
    ]
    assert batching_limit({"servers": result["servers"]}) is None


@pytest.mark.slow
async def test_a_random_weight_model_loads_and_generates(tmp_path: Path) -> None:
    """The model the GPU run writes (here at the embedded model's shape): llama.cpp loads it,
    and the story prompts tokenize to about as many tokens as with a trained vocabulary."""
    require_backend("llama_cpp")
    require_modules("gguf")
    from runtime.bench.random_model import SHAPES, write_random_llama
    from runtime.core.config import RuntimeConfig
    from runtime.core.messages import GenerateRequest
    from runtime.runtime import Runtime

    path = tmp_path / "random-135m.gguf"
    size = await anyio.to_thread.run_sync(write_random_llama, path, "135m")  # seconds: off the loop
    assert size == path.stat().st_size > 200 << 20
    config = RuntimeConfig(model=str(path), slots=2, n_ctx_per_slot=128, threads=1, memory_source="none")
    async with Runtime(config, probe=None) as rt:
        result = await rt.complete(GenerateRequest(prompt=prompts(1)[0], max_tokens=4, temperature=0))
        info = rt.backend.info
    assert (info.n_layer, info.n_vocab) == (SHAPES["135m"]["n_layer"], SHAPES["135m"]["n_vocab"])
    assert result.stats.completion_tokens >= 1
    assert 10 <= result.stats.prompt_tokens <= 40  # 17 words, 84 characters


async def test_gpu_rate_section_carries_every_token_each_way() -> None:
    """Section 6 in small: 4 requests of 12 tokens on 2 ms steps, embedded, SSE and NDJSON
    (the server in a child process): every token counted, the limit from the measured sleep."""
    from runtime.bench.gpu_rate import MODES, measure_gpu_rate
    from runtime.bench.report import gpu_rate_medians, targets

    rows = await measure_gpu_rate(12, cases=[(4, 0.002)], rounds=1)
    assert [r.mode for r in rows] == list(MODES)
    for r in rows:
        assert r.tokens == 4 * 12
        assert 0.0015 < r.step_measured_s < 0.05
        assert r.limit_tokens_per_s == pytest.approx(4 / r.step_measured_s)
        assert 0 < r.ratio <= 1.05 and r.ratio == pytest.approx(r.tokens_per_s / r.limit_tokens_per_s)
    as_json = [{**msgspec.to_builtins(r), "n": 128} for r in rows]
    assert len(gpu_rate_medians(as_json + as_json)) == 3
    assert [what for what, *_ in targets({"gpu_rate": as_json})] == [
        f"GPU rate N=128, {mode} / one step per token" for mode in MODES
    ]


def test_sampling_figures_compare_the_chain_with_argmax() -> None:
    require_backend("llama_cpp")
    from runtime.bench.sampling import measure_sampling

    f = measure_sampling(TINY, n=2, steps=3)
    assert (f.n, f.steps) == (2, 3)
    assert 0 < f.argmax_step_s < f.decode_step_s and 0 < f.chain_step_s < f.decode_step_s
    assert f.chain_per_row_us == pytest.approx(f.chain_step_s / 2 * 1e6)
