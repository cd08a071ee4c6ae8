"""Admission over HTTP: the tenant, priority and deadline headers (and OpenAI's ``user``), their
typed 400s, 429 for a tenant over its queue cap and 503 for a missed deadline, each with a
Retry-After from the prediction; /api/ps lists the queue; an HTTP stream has no queue event."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx

from runtime import Runtime
from runtime.server import ServerSettings, create_app
from tests.helpers import greedy, open_runtime, wait_until


@asynccontextmanager
async def served(
    settings: ServerSettings | None = None, **config: Any
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    async with open_runtime("fake", **config) as rt:
        transport = httpx.ASGITransport(app=create_app(rt, settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield rt, client


def _chat(max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "model": "fake",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        **extra,
    }


async def _busy(rt: Runtime, slots: int) -> list[Any]:
    """Fill ``slots`` slots with long requests, once a step has been measured."""
    streams = [rt.generate(greedy(f"long{i}", 200)) for i in range(slots)]
    await wait_until(lambda: rt.status().slots_busy == slots and rt.status().steps >= 2)
    return streams


async def test_bad_admission_headers_are_typed_400s_in_each_apis_shape() -> None:
    settings = ServerSettings(max_client_priority=3)
    async with served(settings, slots=1) as (_, client):
        cases = {
            "x-slotserve-priority": ("high", "must be an integer"),
            "x-slotserve-deadline-ms": ("soon", "must be a number of milliseconds"),
        }
        for header, (value, words) in cases.items():
            r = await client.post("/v1/chat/completions", json=_chat(), headers={header: value})
            assert r.status_code == 400 and words in r.json()["error"]["message"]
            assert r.json()["error"]["code"] == "invalid_request"
        r = await client.post("/v1/chat/completions", json=_chat(), headers={"x-slotserve-priority": "4"})
        assert r.status_code == 400 and "at most 3 (max_client_priority)" in r.json()["error"]["message"]
        r = await client.post(
            "/api/chat", json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-slotserve-deadline-ms": "-5"},
        )  # fmt: skip
        assert r.status_code == 400 and "deadline_ms is -5.0" in r.json()["error"]
        r = await client.post("/v1/chat/completions", json=_chat(user="u" * 300))
        assert r.status_code == 400 and "tenant is 300 characters" in r.json()["error"]["message"]
        r = await client.post("/v1/chat/completions", json=_chat(), headers={"x-slotserve-priority": "-7"})
        assert r.status_code == 200  # going behind the default class is always allowed


async def test_a_tenant_over_its_queue_cap_gets_429_while_others_are_served() -> None:
    async with served(slots=1, max_queue=8, tenant_max_queued=1, fake={"step_delay_s": 0.002}) as (
        rt,
        client,
    ):
        running = await _busy(rt, 1)
        queued = rt.generate(greedy("a's one", 4, tenant="a"))
        r = await client.post("/v1/chat/completions", json=_chat(user="a"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "tenant_queue_full"
        assert "tenant 'a' has 1 requests waiting" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        r2 = await client.post(
            "/api/generate", json={"model": "fake", "prompt": "x", "stream": False},
            headers={"x-slotserve-tenant": "a"},
        )  # fmt: skip
        assert r2.status_code == 429 and "tenant 'a'" in r2.json()["error"]  # Ollama's shape
        async with anyio.create_task_group() as tg:

            async def other() -> None:
                answer = await client.post("/v1/chat/completions", json=_chat(user="b"))
                assert answer.status_code == 200

            tg.start_soon(other)
            await wait_until(lambda: len(rt.status().queue) == 2)
            ps = (await client.get("/api/ps")).json()["models"][0]["slotserve"]["queue"]
            assert [(q["position"], q["tenant"]) for q in ps] == [(0, "a"), (1, "b")]
            assert all(q["predicted_start_s"] is not None for q in ps)
            for s in running:
                await s.aclose()
            assert (await queued.collect()).done_reason == "length"


async def test_a_missed_deadline_is_503_with_the_predicted_retry_after() -> None:
    async with served(slots=1, max_queue=8, fake={"step_delay_s": 0.01}) as (rt, client):
        running = await _busy(rt, 1)  # about 2 s left
        r = await client.post(
            "/v1/chat/completions", json=_chat(), headers={"x-slotserve-deadline-ms": "100"}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "deadline_unmet"
        assert "deadline_ms is 100" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 5  # about 2 s, rounded up to whole seconds
        for s in running:
            await s.aclose()
        assert rt.status().requests_rejected == 1


async def test_an_http_stream_has_no_queue_event() -> None:
    async with served(slots=1, max_queue=4, fake={"step_delay_s": 0.002}) as (_, client):
        r = await client.post("/v1/chat/completions", json=_chat(stream=True, user="web"))
        lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert all('"queue"' not in line for line in lines)
        r = await client.post(
            "/api/generate", json={"model": "fake", "prompt": "x", "options": {"num_predict": 3}}
        )
        assert r.status_code == 200 and all('"queue"' not in line for line in r.text.splitlines())
