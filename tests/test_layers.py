"""The folders are the layers, and imports run one way, down (trio checks its layering so).

::

    faces      runtime (the public API), runtime.runtime, runtime.metrics, runtime.server,
               runtime.bench, runtime.cli, runtime.main_job
    actors     actors.*
    backends   runtime.backends.*
    core       runtime.core.*

A layer imports only its own and the layers below it; the metrics read records through a
protocol, not the Runtime class. Function-level and type-only imports count too: they are
dependencies all the same.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("core", "backends", "actors", "faces")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = sorted(module_name(p) for top in ("runtime", "actors") for p in (ROOT / top).rglob("*.py"))


def layer(module: str) -> str | None:
    """The layer of one of our modules (None: not ours)."""
    if module.startswith("runtime.core"):
        return "core"
    if module.startswith("runtime.backends"):
        return "backends"
    if module == "actors" or module.startswith("actors."):
        return "actors"
    if module == "runtime" or module.startswith("runtime."):
        return "faces"
    return None


def imports_of(module: str) -> set[str]:
    """Every module ``module`` imports, anywhere in its file (relative imports resolved)."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


def test_the_layers_are_what_the_folders_say() -> None:
    """Every module of ours is in a layer, and each layer has modules."""
    layers = {m: layer(m) for m in MODULES}
    assert None not in layers.values()
    assert set(layers.values()) == set(ORDER)
    assert "actors.scheduler" in MODULES and "runtime.core.records" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_imports_run_one_way_down(module: str) -> None:
    own = layer(module)
    assert own is not None
    for imported in imports_of(module):
        target = layer(imported)
        if target is None:
            continue
        assert ORDER.index(target) <= ORDER.index(own), f"{module} ({own}) imports {imported} ({target})"
        if own != "faces":
            assert imported != "runtime", f"{module} imports the public API package; import the module itself"


def test_the_metrics_read_records_not_the_runtime() -> None:
    """Not runtime.runtime, nor the public package that hands the Runtime on."""
    for module in MODULES:
        if module.startswith("runtime.metrics"):
            assert not {"runtime.runtime", "runtime"} & imports_of(module), module


def test_only_the_ray_serve_package_imports_ray() -> None:
    """Ray is an optional extra: the core package, and every face but runtime.ray_serve, run
    without it (function-level imports count)."""
    importers = {m for m in MODULES if any(i == "ray" or i.startswith("ray.") for i in imports_of(m))}
    assert "runtime.ray_serve.engine" in importers
    assert {m for m in importers if not m.startswith("runtime.ray_serve.")} == set()
    assert "ray" not in " ".join(imports_of("runtime.ray_serve.wire"))  # the records cross without it


def test_the_rule_would_catch_an_upward_import() -> None:
    """The checker itself: an import of the actors from the kernel is seen."""
    assert layer("actors.model") == "actors" and layer("runtime.core.ticket") == "core"
    assert "actors.model" in imports_of("actors.slot")
    assert "runtime.core.channel" in imports_of("runtime.core.ticket")
    assert ORDER.index(layer("actors.model") or "") > ORDER.index("core")


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """No circular import hides behind the order in which entry points import things (the Ray
    package's modules only where Ray is installed, and always under CI=true)."""
    with_ray = importlib.util.find_spec("ray") is not None or os.environ.get("CI") == "true"
    modules = [
        m for m in MODULES if with_ray or not m.startswith("runtime.ray_serve.") or m.endswith(".wire")
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        runs = dict(zip(modules, pool.map(lambda m: _fresh(f"import {m}"), modules), strict=True))
    failed = {m: r.stderr.strip().splitlines()[-1:] for m, r in runs.items() if r.returncode != 0}
    assert not failed


def test_the_kernel_alone_is_light() -> None:
    """Importing the kernel's error module loads fewer than 150 modules (a bare interpreter with
    msgspec is about 106), and no kernel module pulls in the layers above it or their libraries."""
    count = _fresh("import sys; import runtime.core.errors; print(len(sys.modules))")
    assert count.returncode == 0, count.stderr
    assert int(count.stdout) < 150
    kernel = [m for m in MODULES if layer(m) == "core"]
    heavy = ("actors", "runtime.backends", "runtime.runtime", "prometheus_client", "starlette", "llama_cpp")
    code = (
        f"import importlib, sys\nfor m in {kernel!r}: importlib.import_module(m)\n"
        f"print(sorted({{n.split('.')[0] if n.split('.')[0] != 'runtime' else n for n in sys.modules}}))"
    )
    run = _fresh(code)
    assert run.returncode == 0, run.stderr
    loaded = ast.literal_eval(run.stdout)
    assert [h for h in heavy if h in loaded] == []
