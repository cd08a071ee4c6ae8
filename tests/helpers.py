"""Opening runtimes for tests, on the fake backend or the embedded model."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import pytest

from runtime import ChatMessage, ChatRequest, Completion, GenerateRequest, Runtime, RuntimeConfig
from runtime.backends.fake import FakeBackend

BACKENDS = ["fake", "llama_cpp", "ctransformers"]


def llama_available() -> bool:
    """Whether llama-cpp-python and the embedded model are installed."""
    try:
        import llama_cpp  # noqa: F401

        from runtime.backends.model_files import resolve_model

        resolve_model("default")
    except Exception:
        return False
    return True


def ctransformers_available() -> bool:
    """Whether ctransformers, gguf and the embedded model (to convert) are installed; nothing is
    imported (importing ctransformers takes a third of a second: not on the event loop)."""
    from runtime.backends.model_files import resolve_model

    if importlib.util.find_spec("ctransformers") is None or importlib.util.find_spec("gguf") is None:
        return False
    try:
        resolve_model("default")
    except Exception:
        return False
    return True


def missing(what: str) -> NoReturn:
    """Skip a test because ``what`` is not installed, except under CI=true: there it fails."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} missing under CI=true")
    pytest.skip(f"{what} not installed")


def require_backend(kind: str) -> None:
    """Skip a test whose backend is missing, except under CI=true, where that is a failure."""
    if kind == "llama_cpp" and not llama_available():
        missing("llama-cpp-python or the embedded model is")
    if kind == "ctransformers" and not ctransformers_available():
        missing("ctransformers, gguf or the embedded model is")


def require_modules(*modules: str) -> None:
    """Skip a test that needs ``modules`` (an extra's packages) if one is missing, except under
    CI=true, where that is a failure."""
    if absent := [m for m in modules if importlib.util.find_spec(m) is None]:
        missing(f"{', '.join(absent)} (the bench extra) is")


@functools.cache
def ctransformers_smollm2() -> str:
    """The embedded SmolLM2 converted for ctransformers (once per test session, in a temp dir)."""
    from runtime.backends.ctransformers.convert import convert_for_ctransformers
    from runtime.backends.model_files import resolve_model

    folder = tempfile.mkdtemp(prefix="slotserve-ct-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(convert_for_ctransformers(resolve_model("default"), Path(folder) / "smollm2-ct.gguf"))


@asynccontextmanager
async def open_runtime(
    kind: str, *, fake: dict[str, Any] | None = None, **config: Any
) -> AsyncIterator[Runtime]:
    """A ready Runtime on ``kind``; ``fake`` holds FakeBackend options."""
    require_backend(kind)
    config.setdefault("n_ctx_per_slot", 512)
    if kind == "ctransformers":
        config.setdefault("model", await anyio.to_thread.run_sync(ctransformers_smollm2))
    cfg = RuntimeConfig(backend=kind, **config)  # type: ignore[arg-type]
    backend = None
    if kind == "fake":
        backend = FakeBackend(n_seq_max=cfg.initial_slots, n_ctx_per_slot=cfg.n_ctx_per_slot, **(fake or {}))
    async with Runtime(cfg, backend=backend) as rt:
        yield rt


def greedy(prompt: str, max_tokens: int = 16, **kw: Any) -> GenerateRequest:
    """A greedy (deterministic) request."""
    return GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def chat(text: str, max_tokens: int = 16, **kw: Any) -> ChatRequest:
    """A one-message greedy chat."""
    return ChatRequest(
        messages=(ChatMessage(role="user", content=text),), max_tokens=max_tokens, temperature=0, **kw
    )


PROMPTS = [
    "The capital of France is",
    "List three colours:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "Water boils at",
    "The quick brown fox",
    "In 1492, Columbus sailed across the Atlantic Ocean and reached the islands that are now called",
    "Q: What is 7 times 8?\nA:",
]


async def wait_until(predicate: Callable[[], object], timeout_s: float = 60.0) -> None:
    """Poll ``predicate()`` until it is true (it reads status snapshots: there is no event to
    wait on); fail after ``timeout_s`` seconds."""
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.001)


async def complete_all(
    rt: Runtime, requests: list[GenerateRequest], stagger_s: float = 0.0
) -> list[Completion]:
    """Every request at once (started ``stagger_s`` seconds apart); their answers in order."""
    results: list[Completion | None] = [None] * len(requests)

    async def one(i: int) -> None:
        results[i] = await rt.complete(requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
            if stagger_s:
                await anyio.sleep(stagger_s)
    return [r for r in results if r is not None]
