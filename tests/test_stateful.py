"""A hypothesis state machine over the whole runtime on the fake backend: random submits (of
several priorities and tenants, with per-tenant caps), cancels, slot faults, memory changes and
manual resizes, with the invariants checked after every step."""

from __future__ import annotations

from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runtime import GenerationError, QueueFullError, ResponseStream, Runtime, RuntimeConfig
from runtime.backends.fake import FakeBackend
from runtime.core.messages import DoneReason, RequestStats
from runtime.core.telemetry import ScriptedProbe
from tests.helpers import greedy

KV = 1 << 20
MAX_QUEUE = 3
TENANT_MAX_QUEUED = 2
TENANT_MAX_SLOTS = 2


class Ends:
    """Counts request_finished events per outcome (an Observer)."""

    def __init__(self) -> None:
        self.finished = 0

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None

    def request_finished(
        self, reason: DoneReason, stats: RequestStats | None, error: BaseException | None
    ) -> None:
        self.finished += 1


class RuntimeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.portal_cm = start_blocking_portal()
        self.portal: BlockingPortal = self.portal_cm.__enter__()
        self.probe = ScriptedProbe(free_bytes=3 * KV)
        self.ends = Ends()
        cfg = RuntimeConfig(
            backend="fake", slots="auto", min_slots=1, max_slots=6, max_queue=MAX_QUEUE, prefix_cache=False,
            memory_headroom_fraction=0.0, memory_headroom_bytes=0, resize_interval_s=0.005, resize_cooldown_s=0.0,
            restart_intensity=10_000, restart_backoff_s=0.0, tenant_weights="a=3,b=1",
            tenant_max_queued=TENANT_MAX_QUEUED, tenant_max_slots=TENANT_MAX_SLOTS, queue_aging_s=0.05,
        )  # fmt: skip
        backend = FakeBackend(n_seq_max=1, fault_prompts=["boom"], fault_after=1, step_delay_s=0.0005)
        self.rt_cm = self.portal.wrap_async_context_manager(
            Runtime(cfg, backend=backend, probe=self.probe, observers=[self.ends])
        )
        self.rt: Runtime = self.rt_cm.__enter__()
        self.streams: list[ResponseStream] = []
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.outcomes: dict[int, list[str]] = {}
        self.admitted = 0

    def _consume(self, i: int, stream: ResponseStream) -> None:
        scope = self.scopes[i] = self.portal.call(anyio.CancelScope)  # made on the loop thread

        async def read() -> None:
            with scope:
                try:
                    result = await stream.collect()
                    self.outcomes[i].append(result.done_reason)
                except GenerationError as exc:
                    self.outcomes[i].append(type(exc).__name__)
            if scope.cancelled_caught:
                self.outcomes[i].append("reader cancelled")

        self.portal.start_task_soon(read)

    @rule(
        prompt=st.sampled_from(["alpha", "beta", "gamma", "boom"]),
        max_tokens=st.integers(1, 30),
        priority=st.integers(-1, 1),
        tenant=st.sampled_from(["", "a", "b"]),
    )
    def submit(self, prompt: str, max_tokens: int, priority: int, tenant: str) -> None:
        request = greedy(prompt, max_tokens=max_tokens, priority=priority, tenant=tenant)
        try:
            stream = self.portal.call(lambda: self.rt.generate(request))
        except QueueFullError:  # the mailbox, or the tenant's share of it
            return
        i = len(self.streams)
        self.streams.append(stream)
        self.outcomes[i] = []
        self.admitted += 1
        self._consume(i, stream)

    @precondition(lambda self: bool(self.streams))
    @rule(data=st.data())
    def cancel_the_reader(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.streams) - 1))
        self.portal.call(self.scopes[i].cancel)

    @rule(free_slots=st.integers(-3, 6))
    def memory_changes(self, free_slots: int) -> None:
        self.probe.free_bytes = free_slots * KV

    @rule(slots=st.integers(1, 6))
    def manual_resize(self, slots: int) -> None:
        self.portal.call(self.rt.resize, slots)

    def _quiet(self) -> None:
        """Let pending KV removals run, then look at a consistent snapshot."""

        async def settle() -> None:
            with anyio.fail_after(10):
                while True:
                    model = self.rt.statistics().model
                    if model.pending_trims == 0 and not model.stepping:
                        return
                    await anyio.sleep(0.0005)

        self.portal.call(settle)

    @invariant()
    def invariants_hold(self) -> None:
        self._quiet()

        def check() -> None:  # on the event loop: no command reaches the step loop meanwhile
            status = self.rt.status()
            stats = self.rt.statistics()
            assert status.slots_busy <= max(status.slots_effective, len(stats.supervisor.slots))
            assert status.queue_depth <= MAX_QUEUE
            for tenant in ("", "a", "b"):
                assert sum(q.tenant == tenant for q in status.queue) <= TENANT_MAX_QUEUED
            assert [q.position for q in status.queue] == list(range(status.queue_depth))
            ended = status.requests_completed + status.requests_cancelled + status.requests_failed
            assert status.requests_admitted == self.admitted
            assert status.requests_admitted == ended + status.requests_in_flight
            assert self.ends.finished == ended
            if not stats.model.stepping and stats.model.pending_trims == 0:
                busy = {s.slot for s in stats.supervisor.slots if s.busy}
                for seq in range(self.rt.backend.info.n_seq_max):
                    if seq not in busy:
                        assert self.rt.backend.seq_cells(seq) == 0, f"sequence {seq} outlived its request"

        self.portal.call(lambda: check())
        for i, ends in self.outcomes.items():
            assert len(ends) <= 1, f"request {i} ended {len(ends)} times"

    def teardown(self) -> None:
        try:
            for scope in self.scopes.values():
                self.portal.call(scope.cancel)

            async def drain() -> None:
                with anyio.fail_after(20):
                    while self.rt.status().requests_in_flight:
                        await anyio.sleep(0.001)
                    while any(len(v) == 0 for v in self.outcomes.values()):
                        await anyio.sleep(0.001)

            self.portal.call(drain)
            assert all(len(v) == 1 for v in self.outcomes.values())  # each ended exactly once
        finally:
            self.rt_cm.__exit__(None, None, None)
            self.portal_cm.__exit__(None, None, None)


RuntimeMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRuntimeMachine = RuntimeMachine.TestCase
