"""The admission metrics: queue wait and depth by priority and tenant (bounded labels),
rejections by reason (queue_full, tenant_cap, deadline), the predicted start's error."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from runtime import DeadlineUnmetError, QueueFullError, TenantQueueFullError
from tests.helpers import greedy, wait_until
from tests.test_metrics import fake_runtime, value


async def test_queue_wait_depth_rejections_and_prediction_error_are_measured() -> None:
    reg = CollectorRegistry()
    async with fake_runtime(
        reg, slots=1, max_queue=3, tenant_max_queued=2, metrics_tenants="web", fake={"step_delay_s": 0.002}
    ) as rt:
        first = rt.generate(greedy("first", 60, tenant="web"))
        await wait_until(lambda: rt.status().steps >= 2)
        with pytest.raises(DeadlineUnmetError):
            rt.generate(greedy("late", 4, deadline_ms=1, tenant="web"))
        queued = [
            rt.generate(greedy("w", 4, tenant="web", priority=2)),
            rt.generate(greedy("x", 4, tenant="someone", priority=-3)),
            rt.generate(greedy("y", 4, tenant="someone else")),
        ]
        depth = {
            (p, t): value(reg, "slotserve_queue_requests", priority=p, tenant=t)
            for p, t in [("high", "web"), ("low", "other"), ("default", "other")]
        }
        assert depth == {("high", "web"): 1, ("low", "other"): 1, ("default", "other"): 1}
        with pytest.raises(QueueFullError) as full:
            rt.generate(greedy("z", 4))
        assert full.value.reason == "queue_full" and full.value.retry_after_s is not None
        for stream in [first, *queued]:
            await stream.collect()
        capped = [rt.generate(greedy(f"cap{i}", 40, tenant="web")) for i in range(3)]  # one runs, two wait
        with pytest.raises(TenantQueueFullError):
            rt.generate(greedy("cap3", 40, tenant="web"))
        for stream in capped:
            await stream.collect()
    rejected = {r: value(reg, "slotserve_requests_total", outcome="rejected", reason=r) for r in
                ("queue_full", "tenant_cap", "deadline")}  # fmt: skip
    assert rejected == {"queue_full": 1, "tenant_cap": 1, "deadline": 1}
    waits = {
        (p, t): value(reg, "slotserve_queue_wait_seconds_count", priority=p, tenant=t)
        for p, t in [("default", "web"), ("high", "web"), ("low", "other"), ("default", "other")]
    }
    assert waits[("high", "web")] == waits[("low", "other")] == waits[("default", "other")] == 1
    assert waits[("default", "web")] >= 2  # "first" and the cap's first ones
    assert value(reg, "slotserve_queue_prediction_error_seconds_count") >= 3  # the three that waited
