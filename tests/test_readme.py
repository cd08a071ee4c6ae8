"""README.md stays true: its two commands, every setting, every metric."""

from __future__ import annotations

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


def test_every_metric_is_listed() -> None:
    names = set(re.findall(r"`(slotserve_[a-z_]+)`", (ROOT / "grafana" / "METRICS.md").read_text()))
    assert len(names) > 20
    for name in names:
        assert f"`{name}`" in README, name
