"""Many models: what loading on demand, switching under a memory budget and refusing cost, on
the embedded model and a copy of it under another name (llama.cpp, this machine's CPU or GPU).

::

    python -m runtime.bench.models --json models.json

- ``cold_s``: the first request to a registry model that is not loaded (the load, then the answer).
- ``warm_s``: the same request once it is loaded.
- ``switch_s``: with a budget that fits one registry model besides the default, a request to
  the other one: the idle model is evicted, then the other loads and answers.
- ``refuse_ms``: a request to a model that cannot fit whatever is evicted (refused at once).

Each figure is the median of ``--rounds`` rounds (a fresh Runtime each round).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import msgspec

from runtime.backends.footprint import estimate_model_bytes
from runtime.backends.model_files import resolve_model
from runtime.core.config import RuntimeConfig
from runtime.core.errors import ModelMemoryError
from runtime.core.messages import GenerateRequest
from runtime.core.records import DeviceMemory, MemoryReading
from runtime.core.registry import ModelRegistry
from runtime.core.telemetry import combine
from runtime.runtime import Runtime

__all__ = ["ModelFigures", "measure_models"]


class ModelFigures(msgspec.Struct, frozen=True, kw_only=True):
    """Medians over the rounds, in seconds (``refuse_ms`` in milliseconds)."""

    rounds: int
    cold_s: float
    warm_s: float
    switch_s: float
    refuse_ms: float


class _Budget:
    """A memory probe of a fixed budget: the models' own bytes (from the Runtime) are used."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.rt: Runtime | None = None

    def read(self) -> MemoryReading | None:
        used = sum(m.size_bytes for m in self.rt.loaded_models()) if self.rt else 0
        device = DeviceMemory(device="budget", name="budget", total_bytes=self.total_bytes, used_bytes=used,
                              free_bytes=self.total_bytes - used)  # fmt: skip
        return combine("scripted", [device])


async def _round(folder: Path) -> tuple[float, float, float, float]:
    config = RuntimeConfig(slots=1, n_ctx_per_slot=256, memory_headroom_bytes=0, memory_headroom_fraction=0.0,
                           resize_interval_s=0, keep_alive="-1")  # fmt: skip
    one = estimate_model_bytes(config)
    tables = {"copy-a": {"path": str(folder / "a.gguf")}, "copy-b": {"path": str(folder / "b.gguf")},
              "huge": {"path": str(folder / "a.gguf"), "n_ctx_per_slot": 1 << 20}}  # fmt: skip
    budget = _Budget(int(2.5 * one))  # the default and one copy
    rt = Runtime(config, models=ModelRegistry.load(config, tables), probe=budget)
    budget.rt = rt
    request = GenerateRequest(prompt="The capital of France is", max_tokens=8, temperature=0)
    async with rt:
        start = time.perf_counter()
        await rt.complete(request, model="copy-a")
        cold = time.perf_counter() - start
        start = time.perf_counter()
        await rt.complete(request, model="copy-a")
        warm = time.perf_counter() - start
        start = time.perf_counter()
        await rt.complete(request, model="copy-b")  # copy-a is evicted first
        switch = time.perf_counter() - start
        start = time.perf_counter()
        try:
            await rt.complete(request, model="huge")
        except ModelMemoryError:
            refuse = time.perf_counter() - start
        else:
            raise RuntimeError("the huge model was not refused")
    return cold, warm, switch, refuse * 1e3


async def measure_models(rounds: int = 3) -> ModelFigures:
    """Run the rounds on copies of the embedded model in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="slotserve-models-"))
    try:
        source = resolve_model("default")
        for name in ("a", "b"):
            shutil.copyfile(source, folder / f"{name}.gguf")
        results = [await _round(folder) for _ in range(rounds)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cold, warm, switch, refuse = (statistics.median(column) for column in zip(*results, strict=True))
    return ModelFigures(rounds=rounds, cold_s=cold, warm_s=warm, switch_s=switch, refuse_ms=refuse)


def main() -> None:
    """``python -m runtime.bench.models [--rounds 3] [--json FILE]``: print the figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    figures = anyio.run(measure_models, args.rounds)
    print(f"cold {figures.cold_s:.3f} s, warm {figures.warm_s:.3f} s, switch {figures.switch_s:.3f} s, "
          f"refused in {figures.refuse_ms:.2f} ms (medians of {figures.rounds})")  # fmt: skip
    if args.json:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(figures)))


if __name__ == "__main__":
    main()
