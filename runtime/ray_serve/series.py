"""ReplicaSeries: a prometheus-client collector that gives every Engine replica's series, from
its last report to the Board, with a ``replica`` label."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from runtime.ray_serve.wire import ReplicaReport

__all__ = ["ReplicaSeries"]


class ReplicaSeries:
    """A prometheus-client collector: every replica's series from its last report, with a
    ``replica`` label (sum them away with ``sum without (replica)``)."""

    def __init__(self, reports: Callable[[], list[ReplicaReport]]) -> None:
        self._reports = reports
        self._parsed: dict[str, tuple[float, list[Metric]]] = {}

    def _families(self, report: ReplicaReport) -> list[Metric]:
        rid = report.replica.id
        cached = self._parsed.get(rid)
        if cached is not None and cached[0] == report.at_s:
            return cached[1]
        families = []
        for family in text_string_to_metric_families(report.metrics.decode()):
            metric = Metric(family.name, family.documentation, family.type, family.unit)
            metric.samples = [
                Sample(s.name, {**s.labels, "replica": rid}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            ]
            families.append(metric)
        self._parsed[rid] = (report.at_s, families)
        return families

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        reports = self._reports()
        for report in reports:
            for family in self._families(report):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                into.samples.extend(family.samples)
        live = {r.replica.id for r in reports}
        for rid in list(self._parsed):
            if rid not in live:
                del self._parsed[rid]
        yield from merged.values()
