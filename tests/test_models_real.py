"""Two real models in one Runtime on llama.cpp: the embedded SmolLM2 and a small random-weight
llama (runtime.bench.random_model) under the name ``rand``. Requests to both at once are each
answered by their own model (greedy: each answer equals that model's answer alone), and each
model's weights load once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import pytest

from runtime.backends import Backend, load_backend
from runtime.core.config import RuntimeConfig
from runtime.core.registry import ModelRegistry
from runtime.runtime import Runtime
from tests.helpers import greedy, require_backend, require_modules

TINY = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_head_kv": 2, "n_ff": 128, "n_vocab": 4096}
PROMPTS = ["The capital of France is", "List three colours:"]


async def test_two_models_at_once_answer_as_each_alone_and_load_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_backend("llama_cpp")
    require_modules("gguf")
    from runtime.bench import random_model

    monkeypatch.setitem(random_model.SHAPES, "tiny", TINY)
    path = tmp_path / "rand.gguf"
    await anyio.to_thread.run_sync(random_model.write_random_llama, path, "tiny")
    loads: Counter[str] = Counter()

    def counted(config: RuntimeConfig, n_seq: int) -> Backend:
        loads[config.model] += 1
        return load_backend(config, n_seq)

    config = RuntimeConfig(slots=2, n_ctx_per_slot=256, threads=1)
    models = ModelRegistry.load(config, {"rand": {"path": str(path), "slots": 2}})
    async with Runtime(config, models=models, load=counted) as rt:
        solo = {
            (m, p): (await rt.complete(greedy(p, 8), model=m)).text
            for m in ("default", "rand")
            for p in PROMPTS
        }
        together: dict[tuple[str, str], str] = {}

        async def one(model: str, prompt: str) -> None:
            together[model, prompt] = (await rt.complete(greedy(prompt, 8), model=model)).text

        async with anyio.create_task_group() as tg:
            for key in solo:
                tg.start_soon(one, *key)
        names = [m.name for m in rt.loaded_models()]
    assert together == solo
    assert solo["default", PROMPTS[0]] != solo["rand", PROMPTS[0]]  # two models, two answers
    assert loads == {"default": 1, str(path): 1}
    assert names == ["default", "rand"]
