"""README.md stays true: its two commands, every setting, every metric."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import msgspec

from runtime import RuntimeConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    blocks = re.findall(r"```\n(.*?)\n```", README, flags=re.S)
    setup_and_run, setup_and_test = blocks[0].strip(), blocks[1].strip()
    assert README.index("```") < README.index("\n## ")
    assert "slotserve run" in setup_and_run
    assert "pytest" in setup_and_test
    assert setup_and_test in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_documented_with_its_environment_variable() -> None:
    for field in msgspec.structs.fields(RuntimeConfig):
        assert f"| `{field.name}` |" in README, field.name
        assert f"`SLOTSERVE_{field.name.upper()}`" in README, field.name


def test_every_bench_option_is_documented_and_its_one_variable() -> None:
    from runtime.bench.options import LLAMA_SERVER_ENV, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    benchmarks = " ".join(README[README.index("\n## Benchmarks") : README.index("\n## Backends")].split())
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert f"`{option}" in benchmarks, option
    assert f"`--llama-server auto` (default `${LLAMA_SERVER_ENV}`, else `auto`" in benchmarks
    assert f"`--llama-server`, read from `{LLAMA_SERVER_ENV}`" in " ".join(README.split())  # the one variable


def test_every_metric_is_listed() -> None:
    names = set(re.findall(r"`(slotserve_[a-z_]+)`", (ROOT / "grafana" / "METRICS.md").read_text()))
    assert len(names) > 20
    for name in names:
        assert f"`{name}`" in README, name
