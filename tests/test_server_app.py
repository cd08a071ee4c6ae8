"""The app around the endpoints, on the fake backend: loading and failure as /health reports
them, in-band errors, the body limit, model names, listings, /metrics, embedding, the CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter

import runtime.backends
from runtime import GenerateRequest, ModelLoadError, Runtime, RuntimeConfig
from runtime.backends.fake import FakeBackend
from runtime.server import ServerSettings, create_app, serving
from runtime.server.versions import OLLAMA_VERSION, slotserve_version
from tests.helpers import wait_until
from tests.test_server_clients import http_client, ollama_client, openai_client

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def running(
    settings: ServerSettings | None = None, registry: CollectorRegistry | None = None, **fake: Any
) -> AsyncIterator[tuple[Runtime, str]]:
    """A running fake-backend runtime with 3 slots, served on a free loopback port."""
    cfg = RuntimeConfig(backend="fake", slots=3, max_queue=5, n_ctx_per_slot=512)
    backend = FakeBackend(n_seq_max=3, n_ctx_per_slot=512, **fake)
    async with (
        Runtime(cfg, backend=backend, registry=registry or CollectorRegistry()) as rt,
        serving(create_app(rt, settings)) as url,
    ):
        yield rt, url


async def test_health_says_loading_until_the_model_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app owns a runtime made from a config: it loads in the background, and until then
    /health and the generating endpoints answer 503 with Retry-After."""
    gate = threading.Event()
    load = runtime.backends.load_backend

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return load(*args, **kwargs)

    monkeypatch.setattr("runtime.runtime.load_backend", slow_load)
    app = create_app(RuntimeConfig(backend="fake", slots=2), registry=CollectorRegistry())
    rt: Runtime = app.state.server.runtime
    try:
        async with serving(app) as url, await http_client(url) as client:
            loading = await client.get("/health")
            refused = await client.post("/api/generate", json={"model": "fake", "prompt": "hi"})
            refused_openai = await client.post("/v1/completions", json={"model": "fake", "prompt": "hi"})
            ps_loading = (await client.get("/api/ps")).json()
            gate.set()
            await wait_until(lambda: rt.status().state == "ready")
            ready = await client.get("/health")
            body = {"model": "fake", "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
            answer = await client.post("/api/generate", json=body)
    finally:
        gate.set()
    assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
    assert loading.headers["retry-after"] == "1"
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "the model is still loading; try again shortly"}
    assert refused_openai.status_code == 503
    assert refused_openai.json()["error"]["code"] == "unavailable"
    assert ps_loading == {"models": []}
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ok", "model": "fake", "version": slotserve_version(), "slots": 2, "slots_busy": 0,
        "queue_depth": 0,
    }  # fmt: skip
    assert answer.json()["eval_count"] == 3
    assert rt.status().state == "closed"  # the app stopped the runtime it started


async def test_health_reports_a_model_that_failed_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ModelLoadError("model file '/models/missing.gguf' does not exist")

    monkeypatch.setattr("runtime.runtime.load_backend", broken)
    app = create_app(RuntimeConfig(model="/models/missing.gguf"), registry=CollectorRegistry())
    async with serving(app) as url, await http_client(url) as client:
        await wait_until(lambda: app.state.server.host.load_error is not None)
        health = await client.get("/health")
        refused = await client.post(
            "/api/chat", json={"model": "missing", "messages": [{"role": "user", "content": "x"}]}
        )
    assert health.status_code == 503
    assert "retry-after" not in health.headers
    assert health.json() == {
        "status": "failed",
        "reason": "ModelLoadError: model file '/models/missing.gguf' does not exist",
    }
    assert refused.status_code == 503
    assert "does not exist" in refused.json()["error"]


async def test_errors_after_streaming_started_are_sent_in_band_and_a_failed_runtime_is_reported() -> None:
    """A slot crash after the first chunk: Ollama's stream ends with an {"error"} line, OpenAI's
    with an error event and [DONE], and the official clients raise it. The second crash is one
    more than restart_intensity=1 allows, so the runtime fails and /health says why."""
    cfg = RuntimeConfig(backend="fake", slots=1, n_ctx_per_slot=512, restart_intensity=1, restart_period_s=60)
    backend = FakeBackend(n_seq_max=1, n_ctx_per_slot=512, fault_prompts=["boom"], fault_after=3)
    async with (
        Runtime(cfg, backend=backend, registry=CollectorRegistry()) as rt,
        serving(create_app(rt)) as url,
        await ollama_client(url) as oc,
        await openai_client(url) as ac,
        await http_client(url) as client,
    ):
        parts: list[str] = []
        texts: list[str] = []

        async def read_ollama() -> None:
            async for part in await oc.generate(model="fake", prompt="boom", raw=True, stream=True):
                parts.append(part.response or "")

        async def read_openai() -> None:
            async for chunk in await ac.completions.create(model="fake", prompt="boom", stream=True):
                texts.append(chunk.choices[0].text)

        with pytest.raises(ollama.ResponseError, match="injected fault") as in_band:
            await read_ollama()
        with pytest.raises(openai.APIError, match="injected fault"):
            await read_openai()
        await wait_until(lambda: rt.status().state == "failed")
        health = await client.get("/health")
        refused = await client.post("/v1/completions", json={"model": "fake", "prompt": "hi"})
    assert len(parts) == 2  # two tokens streamed, the third crashed the slot
    assert in_band.value.status_code == -1  # it came in-band, after the 200
    assert len(texts) == 2
    assert health.status_code == 503
    assert health.json()["status"] == "failed"
    assert "more than 1 restarts" in health.json()["reason"]
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "runtime_failed"


async def test_the_body_limit_refuses_big_bodies_with_413() -> None:
    settings = ServerSettings(max_body_bytes=2000)
    async with running(settings) as (_, url), await http_client(url) as client:
        declared = await client.post("/api/generate", json={"model": "fake", "prompt": "x" * 3000})

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            yield b'{"model": "fake", "prompt": "'
            for _ in range(30):
                yield b"x" * 100
            yield b'"}'

        streamed = await client.post("/v1/completions", content=chunks())
        body = {"model": "fake", "prompt": "x" * 400, "stream": False, "options": {"num_predict": 2}}
        fits = await client.post("/api/generate", json=body)
    assert declared.status_code == 413
    assert declared.json()["error"].endswith("the limit is 2,000 (max_body_bytes)")
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "body_too_large"
    assert fits.status_code == 200


async def test_model_names_listings_and_version() -> None:
    settings = ServerSettings(model_name="my-model")
    async with (
        running(settings) as (rt, url),
        await ollama_client(url) as oc,
        await openai_client(url) as ac,
        await http_client(url) as client,
    ):
        accepted = []
        for name in ["my-model", "MY-MODEL:latest", "default", "slotserve", "fake"]:
            r = await oc.generate(model=name, prompt="x", raw=True, options={"num_predict": 1})
            accepted.append(r.done)
        refused = []
        for name in ["other", "fake:7b", "../fake", "/tmp/model.gguf"]:
            with pytest.raises(ollama.ResponseError) as info:
                await oc.generate(model=name, prompt="x")
            refused.append(info.value.status_code)
        tags = await oc.list()
        ps = await oc.ps()
        ps_raw = (await client.get("/api/ps")).json()
        models = await ac.models.list()
        root = await client.get("/")
        got_version = (await client.get("/api/version")).json()
        loaded = await oc.generate(model="my-model")  # an empty prompt: Ollama's "load the model"
    assert accepted == [True] * 5
    assert refused == [404] * 4
    assert [m.model for m in tags.models] == [
        "my-model:latest",
        "fake:latest",
        "default:latest",
        "slotserve:latest",
    ]
    assert {m.size for m in tags.models} == {rt.backend.info.weights_bytes}  # the fake has no file
    assert {m.digest for m in tags.models} == {hashlib.sha256(b"fake").hexdigest()}
    assert ps.models[0].context_length == 512
    assert ps.models[0].size == rt.backend.info.weights_bytes + 3 * rt.backend.info.kv_bytes_per_slot
    ours = ps_raw["models"][0]["slotserve"]
    assert (ours["slots_effective"], ours["queue_capacity"], ours["slots_busy"]) == (3, 5, 0)
    assert ours["requests_completed"] == 5
    assert [m.id for m in models.data] == ["my-model"]
    assert root.text == "slotserve is running"
    assert got_version == {"version": OLLAMA_VERSION, "slotserve_version": slotserve_version()}
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")


async def test_metrics_serves_the_runtimes_registry() -> None:
    registry = CollectorRegistry()
    marker = Counter("slotserve_test_marker", "a marker for this test", registry=registry)
    marker.inc(7)
    async with running(registry=registry) as (_, url), await http_client(url) as client:
        await client.post(
            "/api/generate", json={"model": "fake", "prompt": "x", "options": {"num_predict": 2}}
        )
        metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "slotserve_test_marker_total 7.0" in metrics.text


async def test_an_embedded_app_does_not_stop_the_runtime_it_serves() -> None:
    cfg = RuntimeConfig(backend="fake", slots=1, n_ctx_per_slot=512)
    async with Runtime(
        cfg, backend=FakeBackend(n_seq_max=1, n_ctx_per_slot=512), registry=CollectorRegistry()
    ) as rt:
        async with serving(create_app(rt)) as url, await http_client(url) as client:
            ok = await client.get("/health")
        after = await rt.complete(GenerateRequest(prompt="still here", max_tokens=3))
    assert ok.status_code == 200
    assert after.stats.completion_tokens == 3


def test_settings_come_from_the_environment_and_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime import ConfigError

    monkeypatch.setenv("SLOTSERVE_PORT", "8080")
    monkeypatch.setenv("SLOTSERVE_MAX_BODY_BYTES", "4096")
    settings = ServerSettings.load(host="0.0.0.0")
    assert (settings.host, settings.port, settings.max_body_bytes) == ("0.0.0.0", 8080, 4096)
    assert ServerSettings.load(port=9000).port == 9000  # an argument wins over the environment
    with pytest.raises(ConfigError, match="port is 70000"):
        ServerSettings(port=70000)
    monkeypatch.setenv("SLOTSERVE_MAX_BODY_BYTES", "lots")
    with pytest.raises(ConfigError, match="max_body_bytes"):
        ServerSettings.load()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_slotserve_serve_runs_until_sigint() -> None:
    """``slotserve serve`` takes its settings from SLOTSERVE_* variables, binds 127.0.0.1, and
    stops cleanly (exit status 0) on SIGINT."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTSERVE_")}
    env |= {"SLOTSERVE_PORT": str(port), "SLOTSERVE_MAX_QUEUE": "3"}
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--backend", "fake", "--slots", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        health = None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    health = client.get("/health")
                    if health.status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            ps = client.get("/api/ps").json()["models"][0]["slotserve"]
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert health is not None
    assert health.status_code == 200
    assert (ps["slots_effective"], ps["queue_capacity"]) == (2, 3)
    assert proc.returncode == 0, stderr.decode()
    assert f"serving on http://127.0.0.1:{port}" in stderr.decode()
