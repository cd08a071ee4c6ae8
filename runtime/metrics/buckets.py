"""Histogram bucket edges (upper bounds; seconds, tokens or sequences).

One set of edges has to resolve a 135M model on a laptop CPU (steps of a few milliseconds, a
short answer in well under a second) as well as a large model on a GPU or on a CPU (tens to
hundreds of milliseconds per token, minutes for a long prompt behind a queue). So the edges are
about geometric, 1-1.5-2-3-5-7.5 per decade, from the fastest value we can see (sub-millisecond
steps on an H200) to the slowest a client still waits for: every scale gets several buckets
around its median and its tail, and ``histogram_quantile``, which interpolates inside a bucket,
is off by at most the width of one (about 50%) wherever the value falls. The latency sets stop
where a client has given up (ITL 5 s, TTFT 5 min, e2e 40 min); slower values land in +Inf and
still count. Token counts double per bucket up to a 128k-token context. Sequences per step are
exact up to 4 (small CPU batches), then about geometric up to 512.
"""

from __future__ import annotations

__all__ = [
    "FIRST_TOKEN_SECONDS",
    "QUEUE_SECONDS",
    "REQUEST_SECONDS",
    "RESIZE_PAUSE_SECONDS",
    "SEQUENCES",
    "STEP_SECONDS",
    "TOKENS",
]

STEP_SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
"""Inter-token latency and step duration: 0.5 ms to 5 s."""

FIRST_TOKEN_SECONDS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
"""Time to first token and prefill time: 5 ms to 5 min."""

REQUEST_SECONDS = (
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
    15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 2400.0,
)  # fmt: skip
"""End-to-end latency and decode time: 50 ms to 40 min."""

QUEUE_SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
"""Queue wait: microseconds when a slot is idle, minutes behind a long queue."""

RESIZE_PAUSE_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Time no step could run while the context was replaced: a small CPU context to a large GPU one."""

TOKENS = tuple(float(2**i) for i in range(18))
"""Prompt and generated tokens per request: 1 to 131,072."""

SEQUENCES = (
    1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0,
)  # fmt: skip
"""Sequences per decode step."""
