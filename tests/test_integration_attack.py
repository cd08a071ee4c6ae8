"""The merged features together (fake backend): many models x admission, the slot door x the
fair queue, resizes with both in place. Each test is a seam found by attacking the merge."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from runtime import DeadlineUnmetError, InvalidRequestError, QueueFullError, Runtime
from runtime.backends.fake import FakeBackend
from runtime.core.config import RuntimeConfig
from runtime.core.messages import GenerateRequest
from runtime.core.registry import ModelSpec
from runtime.server import create_app, serving
from tests.helpers import greedy, open_runtime, wait_until
from tests.model_fleet import Device, Fleet, fleet_runtime
from tests.test_server_clients import http_client

MiB = 1 << 20
A = ModelSpec(name="a", path="a.gguf")


class SlowFleet(Fleet):
    """A fleet whose loads wait for ``gate`` (a model that is still loading)."""

    def __init__(self) -> None:
        super().__init__(Device(1 << 40), {"default": 10 * MiB, "a.gguf": 10 * MiB}, {})
        self.gate = threading.Event()

    def load(self, config: RuntimeConfig, n_seq: int) -> FakeBackend:
        if config.model != "default":
            self.gate.wait(10)
        return super().load(config, n_seq)


async def test_a_deadline_counts_the_wait_for_the_models_load() -> None:
    """deadline_ms bounds the first token from when the caller asked: a model that loads past
    it refuses the request (DeadlineUnmetError), never serves it late."""
    f = SlowFleet()
    async with fleet_runtime(f, [A]) as rt:
        stream = rt.generate(greedy("hi", 4, deadline_ms=50), model="a")
        late = rt.generate(greedy("hi", 4), model="a")
        async with anyio.create_task_group() as tg:

            async def release() -> None:
                await anyio.sleep(0.3)
                f.gate.set()

            tg.start_soon(release)
            start = time.perf_counter()
            with pytest.raises(DeadlineUnmetError, match="deadline_ms is 50"):
                await stream.collect()
            assert time.perf_counter() - start >= 0.25
            assert (await late.collect()).text  # the model serves on


async def _one(
    rt: Runtime, i: int, ends: dict[int, str], running: dict[str, int], peak: dict[str, int]
) -> None:
    """Request ``i`` of the mixed load: record how it ended (once) and its tenant's concurrency."""
    tenant = "abc"[i % 3]
    kw: dict[str, Any] = {"tenant": tenant, "priority": (i % 4) * 3}
    if i % 5 == 0:
        kw["format"] = "json"
    prompt = "boom" if i % 11 == 0 else f"a shared system prompt, then {i % 4} and {i}"
    stream = rt.generate(greedy(prompt, 12, **kw), admission_timeout_s=30)
    started = False
    try:
        async for chunk in stream:
            if not started and chunk.queue is None:
                started = True
                running[tenant] += 1
                peak[tenant] = max(peak[tenant], running[tenant])
            if i % 7 == 0 and started:
                break  # a caller that goes away mid-answer
            await anyio.lowlevel.checkpoint()
        outcome = "cancel" if i % 7 == 0 and started else "done"
    except Exception as exc:
        outcome = type(exc).__name__
    finally:
        if started:
            running[tenant] -= 1
        await stream.aclose()
    assert i not in ends
    ends[i] = outcome


async def test_a_mixed_load_through_the_door_with_resizes_ends_every_request_once() -> None:
    """Tenants (capped at one slot each), priorities, prefix placement, JSON constraints, slot
    crashes, callers that leave, and a shrink and grow meanwhile: every request ends exactly once,
    no tenant ever runs on two slots, and nothing is left queued, running or counted after."""
    n = 60
    async with open_runtime(
        "fake", slots=4, max_queue=256, tenant_max_slots=1, restart_intensity=1000, restart_backoff_s=0.001,
        fake={"step_delay_s": 0.001, "fault_prompts": ["boom"]},
    ) as rt:  # fmt: skip
        ends: dict[int, str] = {}
        running = dict.fromkeys("abc", 0)
        peak = dict.fromkeys("abc", 0)
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(_one, rt, i, ends, running, peak)
            await wait_until(lambda: len(ends) >= 10)
            assert await rt.resize(2) is not None
            await wait_until(lambda: len(ends) >= 30)
            assert await rt.resize(4) is not None
        assert sorted(ends) == list(range(n))
        await wait_until(lambda: rt.status().requests_in_flight == 0, timeout_s=5)
        status = rt.status()
        assert (status.slots_busy, status.queue_depth) == (0, 0)
        assert peak["a"] == peak["b"] == peak["c"] == 1
        assert (await rt.complete(greedy("still serving", 4))).text
    bad = {i: e for i, e in ends.items() if e not in ("done", "cancel") and i % 11}
    assert bad == {}


async def test_api_ps_lists_each_models_queue_and_the_requests_waiting_for_a_load() -> None:
    """/api/ps (and loaded_models) give every model's queue, not only the default's: the
    requests queued on a busy registry model, and those waiting for a model still loading."""
    f = SlowFleet()
    b = ModelSpec(name="b", path="b.gguf")
    f.weights["b.gguf"] = 10 * MiB
    f.step_delay_s = 0.01
    async with fleet_runtime(f, [A, b], slots=1) as rt, serving(create_app(rt)) as url:
        f.gate.set()
        await rt.load("a")
        f.gate.clear()
        streams = [rt.generate(greedy(f"long {i}", 200, tenant=f"t{i}"), model="a") for i in range(3)]
        waiting = [rt.generate(greedy("hi", 4), model="b") for _ in range(2)]
        async with anyio.create_task_group() as tg:
            for s in streams + waiting:
                tg.start_soon(s.collect)
            await wait_until(lambda: {m.name: m.state for m in rt.loaded_models()}.get("b") == "loading")
            await wait_until(lambda: {m.name: m.slots_busy for m in rt.loaded_models()}.get("a") == 1)
            listed = {m.name: m for m in rt.loaded_models()}
            async with await http_client(url) as client:
                ps = (await client.get("/api/ps")).json()
            f.gate.set()
            tg.cancel_scope.cancel()  # the callers leave
    assert (listed["a"].queue_depth, listed["b"].queue_depth) == (2, 2)
    assert [q.tenant for q in listed["a"].queue] == ["t1", "t2"]
    by_name = {m["name"]: m["slotserve"] for m in ps["models"]}
    assert by_name["a:latest"]["queue_depth"] == 2 and by_name["b:latest"]["queue_depth"] == 2
    assert [q["tenant"] for q in by_name["a:latest"]["queue"]] == ["t1", "t2"]


async def test_http_deadline_on_a_loading_model_is_503_deadline_unmet_in_each_apis_shape() -> None:
    """X-Slotserve-Deadline-Ms on a model still loading: once the load has used the deadline up,
    each API answers its own 503 with Retry-After (streamed or not), and the model then serves."""
    f = SlowFleet()
    async with fleet_runtime(f, [A]) as rt, serving(create_app(rt)) as url:
        msgs = [{"role": "user", "content": "hi"}]
        headers = {"X-Slotserve-Deadline-Ms": "50", "X-Slotserve-Tenant": "t1", "X-Slotserve-Priority": "1"}
        async with await http_client(url) as client:

            async def ask(path: str, body: dict[str, Any]) -> httpx.Response:
                return await client.post(path, json=body, headers=headers)

            async with anyio.create_task_group() as tg:
                answers: dict[str, httpx.Response] = {}

                async def one(path: str, body: dict[str, Any]) -> None:
                    answers[path + str(body.get("stream"))] = await ask(path, body)

                tg.start_soon(one, "/api/chat", {"model": "a", "messages": msgs, "stream": False})
                tg.start_soon(one, "/api/generate", {"model": "a", "prompt": "hi", "stream": True})
                tg.start_soon(one, "/v1/chat/completions", {"model": "a", "messages": msgs})
                tg.start_soon(one, "/v1/completions", {"model": "a", "prompt": "hi", "stream": True})
                await wait_until(
                    lambda: len(rt.loaded_models()) == 2 and rt.loaded_models()[1].queue_depth == 4
                )
                await anyio.sleep(0.1)
                f.gate.set()
            after = await client.post("/api/generate", json={"model": "a", "prompt": "hi", "stream": False})
    assert {k: r.status_code for k, r in answers.items()} == dict.fromkeys(answers, 503)
    assert all(r.headers["retry-after"] == "1" for r in answers.values())
    assert "deadline_ms is 50" in answers["/api/chatFalse"].json()["error"]
    assert "deadline_ms is 50" in answers["/api/generateTrue"].json()["error"]
    for key in ("/v1/chat/completionsNone", "/v1/completionsTrue"):
        assert answers[key].json()["error"]["code"] == "deadline_unmet"
    assert after.status_code == 200 and after.json()["done"] is True


def _rejected(rt: Runtime, model: str, reason: str) -> float | None:
    return rt.registry.get_sample_value(
        "slotserve_requests_total", {"model": model, "outcome": "rejected", "reason": reason}
    )


async def test_a_refusal_while_a_model_loads_is_counted_under_its_name() -> None:
    """max_queue full of requests waiting for a load: the next is refused, and
    slotserve_requests_total counts it under the model's label (not lost, not the default's)."""
    f = SlowFleet()
    async with fleet_runtime(f, [A], max_queue=2) as rt:
        waiting = [rt.generate(greedy("hi", 4), model="a") for _ in range(2)]
        with pytest.raises(QueueFullError):
            rt.generate(greedy("hi", 4), model="a")
        f.gate.set()
        texts = [(await s.collect()).text for s in waiting]
        counted = _rejected(rt, "a", "queue_full")
        default = _rejected(rt, "default", "queue_full")
    assert texts == ["ocrx", "ocrx"]
    assert counted == 1.0 and default in (None, 0.0)


async def test_n_choices_never_take_a_tenant_past_tenant_max_slots() -> None:
    """The n choices of one request run side by side, so they start together only where the
    tenant's cap has room for all n; n above the cap is refused at once, naming the limit."""
    async with open_runtime("fake", slots=4, tenant_max_slots=2, fake={"step_delay_s": 0.002}) as rt:
        with pytest.raises(InvalidRequestError, match="n is 3; tenant_max_slots is 2"):
            rt.generate_choices(GenerateRequest(prompt="hi", max_tokens=4, tenant="x", temperature=0.8), 3)
        first = rt.generate(greedy("one", 60, tenant="x"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.collect)
            await wait_until(lambda: rt.status().slots_busy == 1)
            pair = rt.generate_choices(
                GenerateRequest(prompt="hi", max_tokens=4, tenant="x", temperature=0.8), 2
            )
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rt.status().slots_busy)
                    await anyio.sleep(0.001)

            tg.start_soon(watch)
            choices = await pair.collect()
            tg.cancel_scope.cancel()
    assert len(choices) == 2 and peak <= 2  # the pair waited for the first request's slot
    assert min(c.stats.queue_duration_ns for c in choices) > 0


async def test_a_deadline_counts_the_wait_for_room_in_the_queue() -> None:
    """With admission_timeout_s a request waits for room in a full queue; that wait spends its
    deadline_ms too: once it is spent, the request is refused, not served late."""
    async with open_runtime("fake", slots=1, max_queue=1, fake={"step_delay_s": 0.005}) as rt:
        long = rt.generate(greedy("long", 40))
        queued = rt.generate(greedy("queued", 4))
        async with anyio.create_task_group() as tg:
            tg.start_soon(long.collect)
            tg.start_soon(queued.collect)
            await wait_until(lambda: rt.status().queue_depth == 1)
            late = rt.generate(greedy("late", 4, deadline_ms=30), admission_timeout_s=10)
            start = time.perf_counter()
            with pytest.raises(DeadlineUnmetError, match="deadline_ms is 30"):
                await late.collect()
            waited_s = time.perf_counter() - start
    assert waited_s >= 0.03
