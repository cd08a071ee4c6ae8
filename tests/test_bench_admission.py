"""Section 8 of the benchmarks (runtime.bench.admission) runs and reports what it measured,
at a small scale (the figures themselves are the benchmark's to print, not a test's to assert)."""

from __future__ import annotations

import io

from runtime.bench.admission import measure_admission, print_admission


async def test_the_admission_section_measures_and_prints() -> None:
    figures = await measure_admission(flood=10, window_s=0.5, requests=12)
    assert figures.a_completed == 10
    assert figures.b_queue_p50_fifo_s > figures.b_queue_p50_fair_s  # B behind all of A's without fairness
    assert figures.web_per_batch_started > 1.5  # weights 3:1
    assert 0 <= figures.predicted_within_25_percent <= 1
    assert 0 < figures.deadline_refusal_ms_median <= figures.deadline_refusal_ms_max
    assert figures.retry_after_over_slot_free > 0
    assert figures.preempted_text_equal  # the parked request's greedy text is its text alone
    assert figures.high_queue_ms_preempting < figures.high_queue_ms_waiting  # it did not wait for 120 steps
    out = io.StringIO()
    print_admission(figures, out)
    assert "section 9: admission" in out.getvalue() and "weights 3:1" in out.getvalue()
