"""The command and the examples run for real, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cli import main
from tests.helpers import require_backend

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)


def test_slotserve_run_completes_with_a_summary(tmp_path: Path) -> None:
    require_backend("llama_cpp")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(["Say hello.", "Name a colour.", "Count to three.", "Name a fruit.", "Say bye."])
    )
    report = tmp_path / "report.json"
    proc = run(
        sys.executable,
        "-m",
        "runtime.cli",
        "run",
        "--prompts",
        str(prompts),
        "--max-tokens",
        "16",
        "--json",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Concurrent (4 slots)" in proc.stdout and "One at a time" in proc.stdout
    assert "tok/s aggregate" in proc.stdout
    data = json.loads(report.read_text())
    assert len(data["concurrent"]["requests"]) == len(data["sequential"]["requests"]) == 5
    assert data["concurrent"]["completion_tokens"] == data["sequential"]["completion_tokens"] > 0
    assert data["speedup"] > 0


def test_slotserve_generate_streams_an_answer() -> None:
    require_backend("llama_cpp")
    proc = run(
        sys.executable,
        "-m",
        "runtime.cli",
        "generate",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "What is 2+2?",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 0


def test_generate_with_a_missing_model_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    proc = run(sys.executable, "-m", "runtime.cli", "generate", "--model", str(tmp_path / "no.gguf"), "hi")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_embed_example_runs() -> None:
    require_backend("llama_cpp")
    proc = run(sys.executable, "examples/embed.py")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Q: ") == 4
    assert "4 answered by 4 slots" in proc.stdout


def test_slotserve_serve_refuses_ray_options_without_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--backend", "fake", "--replicas", "2"]) == 2
    assert "--replicas and --address go with --ray" in capsys.readouterr().err


def test_a_commands_own_slot_count_gives_way_to_the_environment_and_the_toml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.cli import _config, build_parser

    def slots(*argv: str) -> object:
        return _config(build_parser().parse_args(list(argv))).slots

    monkeypatch.delenv("SLOTSERVE_SLOTS", raising=False)
    assert slots("generate", "hi") == 1  # its own default
    assert slots("run") == 4
    assert slots("run", "--slots", "auto") == "auto"
    toml = tmp_path / "s.toml"
    toml.write_text("slots = 3\n")
    assert slots("generate", "hi", "--config", str(toml)) == 3
    assert slots("run", "--config", str(toml)) == 3
    monkeypatch.setenv("SLOTSERVE_SLOTS", "2")
    assert slots("generate", "hi") == 2 and slots("run") == 2
    assert slots("run", "--slots", "5") == 5  # an option goes before everything
    with pytest.raises(SystemExit):
        slots("run", "--slots", "many")
