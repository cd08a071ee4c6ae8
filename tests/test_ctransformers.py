"""The ctransformers backend on tiny models the tests write (tests/models.py): seconds, not minutes.

What is shown here: the capabilities and memory accounting it reports, tokenizing that neither
truncates nor overflows on non-ASCII text, special tokens as ids, the explicit context and
its enforcement, reproducible seeded sampling, agreement with llama.cpp on the same GGUF, and
crash isolation: a native abort in the worker fails the requests it held and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from runtime import (
    ConfigError,
    ContextOverflowError,
    GenerateRequest,
    GenerationError,
    Runtime,
    RuntimeConfig,
)
from runtime.backends import load_backend
from runtime.backends.base import StepPlan
from runtime.backends.ctransformers.backend import CTransformersBackend, WorkerDiedError
from tests.helpers import greedy, require_backend
from tests.models import GPT2_N_CTX, LlamaCppReference, write_tiny_gpt2, write_tiny_llama

NON_ASCII = ["café crème brûlée", "日本語のテキスト", "emoji 🎉👍 ok", "🎉" * 300, "naïve Zürich Ελληνικά"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_backend("ctransformers")
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_backend("ctransformers")
    return write_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def backend(path: Path, slots: int = 1, n_ctx_per_slot: int = 48) -> CTransformersBackend:
    cfg = RuntimeConfig(backend="ctransformers", model=str(path), slots=slots, n_ctx_per_slot=n_ctx_per_slot)
    loaded = load_backend(cfg, slots)
    assert isinstance(loaded, CTransformersBackend)
    return loaded


@pytest.fixture
def llama_backend(tiny_llama: Path) -> Iterator[CTransformersBackend]:
    b = backend(tiny_llama, slots=2)
    yield b
    b.close()


def prefill(tokens: list[int], seq_id: int = 0, start: int = 0) -> StepPlan:
    """A plan that evaluates ``tokens`` on one sequence from ``start`` and samples the last
    (greedy: no sampler was set)."""
    n = len(tokens)
    return StepPlan(
        tokens=np.array(tokens, dtype=np.int32),
        positions=np.arange(start, start + n, dtype=np.int32),
        seq_ids=np.full(n, seq_id, dtype=np.int32),
        output_rows=np.array([n - 1], dtype=np.int32),
    )


def test_capabilities_and_memory_accounting(tiny_llama: Path, tiny_gpt2: Path) -> None:
    """Slots are instances; GGUF weights are counted once (mmap), legacy weights per instance."""
    gguf = backend(tiny_llama, slots=3, n_ctx_per_slot=48)
    legacy = backend(tiny_gpt2, slots=2, n_ctx_per_slot=32)
    try:
        g, lg = gguf.info, legacy.info
        assert (g.batched, g.state_export, g.isolated, g.gpu_layers) == (False, False, True, 0)
        assert (g.instances, g.n_seq_max, g.weights_copies, g.instance_bytes) == (3, 3, 1, 0)
        assert g.kv_bytes_per_slot == 48 * 2 * 2 * 32 * 2  # n_ctx x layers x (K, V) x n_embd_kv x f16
        assert (lg.instances, lg.weights_copies, lg.instance_bytes) == (2, 2, tiny_gpt2.stat().st_size)
        assert lg.kv_bytes_per_slot == GPT2_N_CTX * 2 * 2 * 32 * 4  # gpt2 sizes its f32 cache by the file
        assert gguf.statistics().instance_context_length == 48  # explicit, not the library's 512
        assert legacy.statistics().instance_context_length == GPT2_N_CTX  # the gpt2 loader reads the file's
        assert legacy.resize(3) == 0 and legacy.info.weights_copies == 3 and legacy.info.instances == 3
    finally:
        gguf.close()
        legacy.close()


@pytest.mark.parametrize("text", NON_ASCII)
def test_non_ascii_text_tokenizes_whole(
    llama_backend: CTransformersBackend, tiny_gpt2: Path, text: str
) -> None:
    """Byte-fallback and byte tokens make more tokens than characters, past the buffer the
    library's own Python ``tokenize`` allocates (len(text) + 1); nothing is lost."""
    legacy = backend(tiny_gpt2)
    try:
        spm = llama_backend.tokenize(text, add_special=False, parse_special=True)
        raw = legacy.tokenize(text, add_special=False, parse_special=True)
        assert b"".join(llama_backend.pieces[t] for t in spm) == b" " + text.encode()  # SentencePiece's space
        assert b"".join(legacy.pieces[t] for t in raw) == text.encode()
        if text.startswith("🎉"):
            assert len(spm) > len(text) + 1 and len(raw) == len(text.encode()) == 1200
    finally:
        legacy.close()


def test_special_tokens_in_text_become_their_ids(
    llama_backend: CTransformersBackend, tiny_gpt2: Path
) -> None:
    ids = llama_backend.tokenize("<|im_start|>user\nhi<|im_end|>", add_special=True, parse_special=True)
    im_start, im_end = llama_backend.tokenize("<|im_start|><|im_end|>", add_special=False, parse_special=True)
    assert (ids[0], ids[1], ids[-1]) == (1, im_start, im_end)  # BOS, then the control tokens as ids
    assert llama_backend.pieces[im_start] == b"" and im_end in llama_backend.eog_tokens
    assert llama_backend.pieces[3] == b"\x00"  # <0x00>: the library's C string would lose it
    legacy = backend(tiny_gpt2)
    try:
        assert legacy.pieces[0] == b"\x00"
        eot = legacy.tokenize("<|endoftext|>", add_special=True, parse_special=True)
        assert len(eot) == 1 and eot[0] in legacy.eog_tokens
        assert legacy.tokenize("x<|endoftext|>x", add_special=True, parse_special=True) == [
            ord("x"),
            eot[0],
            ord("x"),
        ]
    finally:
        legacy.close()


def test_matches_llama_cpp_on_the_same_gguf(tiny_llama: Path, llama_backend: CTransformersBackend) -> None:
    """Same tokens (specials and SentencePiece's space included), pieces and logits."""
    require_backend("llama_cpp")
    reference = LlamaCppReference(tiny_llama, n_ctx=64)
    try:
        assert [reference.piece(t) for t in range(reference.n_vocab)] == llama_backend.pieces
        for text in [
            "the water",
            "one day he said",
            "<|im_start|>user\nhi<|im_end|>\n",
            "café über",
            "x!y? z.",
        ]:
            tokens = reference.tokenize(text)
            assert llama_backend.tokenize(text, add_special=True, parse_special=True) == tokens, text
            expected, ours = reference.logits(tokens), llama_backend.next_token_logits(tokens)
            assert np.corrcoef(expected, ours)[0, 1] > 0.999 and expected.argmax() == ours.argmax(), text
    finally:
        reference.close()


def test_a_step_never_runs_past_the_context(llama_backend: CTransformersBackend) -> None:
    """The library would silently overwrite the end of its cache; the backend refuses first."""
    tokens = list(range(300, 300 + 47))
    llama_backend.step(prefill(tokens))
    assert llama_backend.seq_cells(0) == 47
    llama_backend.step(prefill([300], start=47))  # the 48th and last cell
    with pytest.raises(RuntimeError, match=r"49 tokens would pass n_ctx_per_slot \(48\)"):
        llama_backend.step(prefill([300], start=48))
    with pytest.raises(RuntimeError, match="do not continue its 48 cells"):
        llama_backend.step(prefill([300], start=50))


def test_legacy_context_cannot_exceed_the_files(tiny_gpt2: Path) -> None:
    with pytest.raises(ConfigError, match=f"fixes its context at {GPT2_N_CTX} tokens"):
        backend(tiny_gpt2, n_ctx_per_slot=GPT2_N_CTX * 2)


def test_unknown_files_and_gpu_layers_are_refused_clearly(tmp_path: Path, tiny_llama: Path) -> None:
    from runtime import ModelLoadError

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="neither a GGUF nor a legacy GGML"):
        backend(junk)
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes((0x67676D6C).to_bytes(4, "little") + bytes(64))
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        backend(legacy)
    cfg = RuntimeConfig(backend="ctransformers", model=str(tiny_llama), slots=1, n_gpu_layers=10)
    with pytest.raises(ConfigError, match="runs on the CPU"):
        load_backend(cfg, 1)


def test_a_dead_worker_is_replaced_and_cached_cells_are_rebuilt(llama_backend: CTransformersBackend) -> None:
    """Sequence 0's cells survive a crash of sequence 1's step: they are evaluated again from
    the tokens the backend keeps, and its next token is what it would have been."""
    prompt = [1, 261, 412, 423, 419, 287, 393]
    llama_backend.step(prefill(prompt))
    reference = llama_backend.next_token_logits([*prompt, 300]).argmax()
    llama_backend.step(prefill(prompt))  # next_token_logits dropped sequence 0's cells
    first_pid = llama_backend.statistics().worker_pid
    llama_backend.inject_native_crash()
    with pytest.raises(WorkerDiedError, match=r"SIGABRT.*GGML_ASSERT.*n_past >= 0"):
        llama_backend.step(prefill([1, 300, 301], seq_id=1))
    assert llama_backend.statistics().worker_pid is None
    assert llama_backend.seq_cells(0) == len(prompt)  # the runtime's view is unchanged
    result = llama_backend.step(prefill([300], start=len(prompt)))
    stats = llama_backend.statistics()
    assert int(result.tokens[0]) == reference
    assert (stats.worker_starts, stats.worker_deaths, stats.tokens_replayed) == (2, 1, len(prompt))
    assert stats.worker_pid not in (None, first_pid)


async def test_seeded_sampling_is_reproducible(tiny_llama: Path) -> None:
    cfg = RuntimeConfig(backend="ctransformers", model=str(tiny_llama), slots=2, n_ctx_per_slot=128)
    request = {"prompt": "the water", "max_tokens": 24, "temperature": 1.5, "top_k": 0, "min_p": 0.0}
    async with Runtime(cfg) as rt:
        one = await rt.complete(GenerateRequest(**request, seed=7))  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:  # concurrently, on other instances
            results: dict[int, tuple[int, ...]] = {}

            async def run(seed: int) -> None:
                results[seed] = (await rt.complete(GenerateRequest(**request, seed=seed))).token_ids  # type: ignore[arg-type]

            for seed in (7, 8):
                tg.start_soon(run, seed)
    assert results[7] == one.token_ids
    assert results[8] != one.token_ids


async def test_context_overflow_is_refused_before_any_compute(tiny_llama: Path) -> None:
    cfg = RuntimeConfig(backend="ctransformers", model=str(tiny_llama), slots=1, n_ctx_per_slot=32)
    async with Runtime(cfg) as rt:
        with pytest.raises(ContextOverflowError, match="slot context is 32 tokens") as info:
            await rt.complete(greedy("the water " * 20, max_tokens=4))
        fits = await rt.complete(greedy("the water", max_tokens=32 - 5))  # 5 prompt tokens: exactly full
        steps = rt.status().steps
    assert info.value.n_ctx_per_slot == 32
    assert fits.done_reason in ("length", "stop") and fits.stats.prompt_tokens == 5
    assert steps >= 1


async def test_a_native_crash_fails_only_the_requests_it_held(tiny_llama: Path) -> None:
    """Two requests in the worker when it aborts fail with the native message; the request
    queued behind them and the next one are served by a new worker; the runtime stays ready."""
    cfg = RuntimeConfig(
        backend="ctransformers", model=str(tiny_llama), slots=2, max_queue=4, n_ctx_per_slot=256,
        restart_backoff_s=0.01,
    )  # fmt: skip
    async with Runtime(cfg) as rt:
        backend = rt.backend
        assert isinstance(backend, CTransformersBackend)
        first_pid = backend.statistics().worker_pid
        held = [rt.generate(greedy(p, max_tokens=200)) for p in ("the water", "one day")]
        for stream in held:
            assert (await stream.__anext__()).token_ids  # both are generating in the worker
        queued = rt.generate(greedy("a b c", max_tokens=10))
        backend.inject_native_crash()
        for stream in held:
            with pytest.raises(GenerationError, match=r"GGML_ASSERT.*n_past >= 0"):
                await stream.collect()
        served = await queued.collect()
        after = await rt.complete(greedy("the water", max_tokens=5))
        status, stats = rt.status(), backend.statistics()
    assert served.stats.completion_tokens == 10 and after.stats.completion_tokens == 5
    assert status.state == "ready" and status.requests_failed == 2 and status.restarts == 1
    assert (stats.worker_deaths, stats.worker_starts) == (1, 2) and stats.worker_pid != first_pid


def test_convert_command_writes_a_loadable_file(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime.cli import main

    target = tmp_path / "out.gguf"
    assert main(["convert", "--for", "ctransformers", str(tiny_llama), str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    converted = backend(target)
    try:
        assert converted.tokenize("the water", add_special=True, parse_special=True) == [
            1,
            261,
            412,
            423,
            419,
        ]
    finally:
        converted.close()
    assert main(["convert", "--for", "ctransformers", str(tmp_path / "missing.gguf"), str(target)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_converter_refuses_what_the_old_loader_cannot_load(tmp_path: Path) -> None:
    import gguf

    from runtime import ModelLoadError
    from runtime.backends.ctransformers.convert import convert_for_ctransformers

    other = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    other.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    odd = gguf.GGUFWriter(tmp_path / "odd.gguf", "llama")
    odd.add_tensor(
        "token_embd.weight", np.zeros((4, 18), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL
    )
    for writer in (other, odd):
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'gpt2'; this converter writes llama"):
        convert_for_ctransformers(tmp_path / "gpt2.gguf", tmp_path / "a.gguf")
    with pytest.raises(ModelLoadError, match=r"tensor 'token_embd\.weight' is IQ4_NL"):
        convert_for_ctransformers(tmp_path / "odd.gguf", tmp_path / "b.gguf")
    with pytest.raises(
        ModelLoadError, match=r"'token_embd\.weight' is IQ4_NL, which ctransformers 0\.2\.27 cannot load"
    ):
        backend(tmp_path / "odd.gguf")


async def test_status_shows_instances_and_weights_per_instance(tiny_gpt2: Path) -> None:
    """A legacy model through the runtime: three slots are three instances, each with its own
    weights, and steps are not batched; generation runs on every slot."""
    cfg = RuntimeConfig(backend="ctransformers", model=str(tiny_gpt2), slots=3, n_ctx_per_slot=GPT2_N_CTX)
    file_bytes = await anyio.Path(tiny_gpt2).stat()
    async with Runtime(cfg) as rt:
        async with anyio.create_task_group() as tg:
            for text in ("the water", "one day", "he said"):
                tg.start_soon(rt.complete, greedy(text, max_tokens=20))
        status = rt.status()
    assert (status.backend, status.batched, status.model_instances) == ("ctransformers", False, 3)
    assert status.weights_resident_bytes == 3 * file_bytes.st_size
    assert status.requests_completed == 3 and status.requests_failed == 0


def test_a_legacy_worker_crash_is_isolated_too(tiny_gpt2: Path) -> None:
    legacy = backend(tiny_gpt2, slots=2)
    try:
        legacy.step(prefill([116, 104, 101]))
        legacy.inject_native_crash()
        with pytest.raises(WorkerDiedError, match="SIGABRT"):
            legacy.step(prefill([116], seq_id=1))
        after = legacy.step(prefill([337], start=3))  # sequence 0 rebuilt in a new worker
        stats = legacy.statistics()
    finally:
        legacy.close()
    assert after.tokens.shape == (1,) and (stats.worker_deaths, stats.tokens_replayed) == (1, 3)
