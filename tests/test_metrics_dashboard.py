"""The Grafana dashboard, its provisioning files and grafana/METRICS.md agree with the metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from runtime.core.telemetry import ScriptedProbe
from tests.helpers import greedy, wait_until
from tests.test_metrics import fake_runtime

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "slotserve.json"
DATASOURCE = "${datasource}"
GRID_COLUMNS = 24
METRIC_NAME = re.compile(r"\bslotserve_[a-z_]+\b")


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries(substitutions: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard, with Grafana's variables replaced
    by ``substitutions`` (longest name first, so ``$__rate_interval`` is not taken for ``$__rate``)."""
    out = []
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(substitutions or {}, key=len, reverse=True):
                expr = expr.replace(name, (substitutions or {})[name])
            out.append((panel["title"], expr))
    return out


def test_dashboard_is_valid() -> None:
    """uid, a Prometheus datasource variable and a model variable; unique panel ids; panels
    inside the 24-column grid and not overlapping; every panel and query on the variable."""
    d = load_dashboard()
    assert d["uid"] == "slotserve-overview"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query"
    assert variables["model"]["datasource"]["uid"] == DATASOURCE
    assert "label_values(slotserve_runtime_state, model)" in variables["model"]["definition"]
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0, p["title"]
        assert g["h"] > 0, p["title"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= GRID_COLUMNS, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[x, y]!r} at {(x, y)}"
                cells[x, y] = p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE, p["title"]
            assert 'model=~"$model"' in t["expr"], (p["title"], t["expr"])
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def test_dashboard_has_the_panels_the_issue_lists() -> None:
    exprs = " ".join(e for _, e in dashboard_queries())
    for needed in (
        "slotserve_prompt_tokens_total", "slotserve_generation_tokens_total",
        "slotserve_time_to_first_token_seconds_bucket", "slotserve_inter_token_latency_seconds_bucket",
        "slotserve_e2e_request_latency_seconds_bucket", "slotserve_queue_depth", "slotserve_queue_capacity",
        "slotserve_slots_busy", "slotserve_slots_effective", "slotserve_slots_configured",
        "slotserve_slots_target", "slotserve_kv_cache_allocated_bytes", "slotserve_device_memory_free_bytes",
        "slotserve_requests_total", "slotserve_actor_restarts_total", "slotserve_slot_resizes_total",
        "slotserve_resize_failures_total", "slotserve_device_memory_used_bytes",
        "slotserve_step_sequences_bucket", "slotserve_queue_requests", "slotserve_queue_wait_seconds_bucket",
        "slotserve_preemptions_total",
        "slotserve_parked_sequences",
    ):  # fmt: skip
        assert needed in exprs, needed


def families_of(registry: CollectorRegistry) -> dict[str, tuple[str, set[str]]]:
    """Family name as exposed (counters with _total) -> (type, label names)."""
    out = {}
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        labels |= set(getattr(family, "_labelnames", ())) - {"le"}  # a gauge with no sample now
        out[name] = (family.type, labels)
    return out


async def exposed_families() -> tuple[dict[str, tuple[str, set[str]]], set[str]]:
    """What a runtime on the fake backend exposes: families, and every sample name."""
    reg = CollectorRegistry()
    probe = ScriptedProbe(free_bytes=8 << 30, total_bytes=16 << 30)
    fixed: dict[str, Any] = {"slots": 2, "min_slots": 2, "max_slots": 2}
    async with fake_runtime(reg, resize_interval_s=0.01, probe=probe, **fixed) as rt:
        await rt.complete(greedy("hello", max_tokens=3))
        await wait_until(lambda: rt.status().memory is not None)
        samples = {s.name for f in reg.collect() for s in f.samples}
        return families_of(reg), samples


async def test_dashboard_queries_only_name_exposed_series() -> None:
    families, samples = await exposed_families()
    for title, expr in dashboard_queries():
        for name in METRIC_NAME.findall(expr):  # a labelled gauge with no sample now is still a family
            assert name in samples or name in families, (
                f"{title!r} queries {name}, which slotserve does not expose"
            )


def metrics_md() -> dict[str, tuple[str, set[str]]]:
    """The table of grafana/METRICS.md: name -> (type, labels)."""
    rows = {}
    for line in (GRAFANA / "METRICS.md").read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("slotserve_"):
            labels = {x.strip().strip("`") for x in cells[2].split(",")}
            rows[cells[0]] = (cells[1], labels - {""})
    return rows


async def test_metrics_md_lists_exactly_what_is_exposed() -> None:
    families, _ = await exposed_families()
    assert metrics_md() == families


def test_provisioning_files_point_at_the_dashboard_and_prometheus() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"].startswith("http")
    prom = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    boards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "slotserve.yml").read_text())
    (provider,) = boards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
