"""examples/http_clients.py runs: it starts ``slotserve serve`` and talks to it through the
official ``ollama`` and ``openai`` clients, then stops it with SIGINT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_backend

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["fake", "llama_cpp"])
def test_http_clients_example_runs(kind: str) -> None:
    require_backend(kind)
    env = os.environ | {"SLOTSERVE_THREADS": "1"}  # on a shared, busy CPU one decode thread is the steadiest
    proc = subprocess.run(
        [sys.executable, "examples/http_clients.py", "--backend", kind],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    served = "fake" if kind == "fake" else "SmolLM2-135M-Instruct.Q4_1"
    assert lines[0] == f"served model: {served}:latest"  # as Ollama lists it
    (ollama_chat,) = [line for line in lines if line.startswith("ollama chat: ")]
    (openai_chat,) = [line for line in lines if line.startswith("openai chat: ")]
    assert ollama_chat.endswith("(24 tokens, length)")
    assert openai_chat.endswith("(24 tokens)")
    assert ollama_chat.split("'")[1] == openai_chat.split("'")[1]  # one request, two APIs, one greedy answer
    assert lines[-1] == "server stopped with status 0"
    assert '"POST /v1/completions HTTP/1.1" 200' in proc.stderr  # uvicorn's access log
