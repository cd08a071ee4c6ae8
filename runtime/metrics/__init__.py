"""Prometheus metrics of a Runtime: counts and histograms from events, gauges when scraped.

Every Runtime makes a :class:`RuntimeMetrics` when it is entered. Its families live on the
registry the Runtime was given (prometheus-client's global ``REGISTRY`` by default) and are
shared by every runtime on that registry, told apart by the ``model`` label, so two runtimes in
one process, or a host application's own metrics, do not clash. Two runtimes of one model on one
registry add up: their counters share series and their gauges are summed.

- ``families``: the counters and histograms, one set per registry; ``buckets``: their edges.
- ``observer``: RuntimeMetrics, which turns runtime.core.events into counts and observations.
- ``source``: StatusSource, the protocol this layer reads (a Runtime is one): records, not internals.
- ``gauges``: the collector that reads ``rt.status()`` and ``rt.statistics()`` at each scrape,
  so gauges never drift (after a mass cancel they are back at idle by themselves).

grafana/METRICS.md lists every series; grafana/ has a dashboard built on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import make_asgi_app

from runtime.metrics.observer import RuntimeMetrics

if TYPE_CHECKING:
    from runtime.metrics.source import RegistrySource

__all__ = ["RuntimeMetrics", "metrics_app"]


def metrics_app(rt: RegistrySource) -> Callable[..., Any]:
    """An ASGI app that serves ``rt.registry`` in the Prometheus exposition format.

    Mount it at ``/metrics`` (prometheus-client's ``make_asgi_app``). It collects on the event
    loop, where the runtime's statistics() snapshots that the gauges read are taken.
    """
    app: Callable[..., Any] = make_asgi_app(registry=rt.registry)
    return app
