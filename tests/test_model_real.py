"""The embedded model: found without a download, loaded once, its memory figures right."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime import ModelLoadError, Runtime, RuntimeConfig
from runtime.backends.model_files import resolve_model
from tests.helpers import PROMPTS, greedy, require_backend

# SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, f16 cache (2 bytes).
SMOLLM2_KV_BYTES_PER_TOKEN = 30 * (3 * 64 + 3 * 64) * 2


def test_default_model_resolves_to_the_packaged_file() -> None:
    require_backend("llama_cpp")
    path = resolve_model("default")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000
    assert path.read_bytes()[:4] == b"GGUF"


def test_missing_model_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("slots", [1, 4])
async def test_weights_load_once_whatever_the_slot_count(slots: int, monkeypatch: pytest.MonkeyPatch) -> None:
    require_backend("llama_cpp")
    import llama_cpp

    loads: list[bytes] = []
    real = llama_cpp.llama_model_load_from_file

    def counting(path: bytes, params: object) -> object:
        loads.append(path)
        return real(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", counting)
    async with Runtime(RuntimeConfig(slots=slots, n_ctx_per_slot=1024)) as rt:
        import anyio

        async with anyio.create_task_group() as tg:
            for p in PROMPTS[:slots]:
                tg.start_soon(rt.complete, greedy(p, max_tokens=4))
        status = rt.status()
        size = llama_cpp.llama_model_size(rt.backend._model)  # type: ignore[attr-defined]
    assert len(loads) == 1
    assert status.weights_bytes == size > 90_000_000
    assert status.kv_bytes_per_slot == 1024 * SMOLLM2_KV_BYTES_PER_TOKEN
    assert status.slots_effective == slots and status.requests_completed == slots
