"""A real Prometheus (Debian's package; .ci/install-prometheus) scrapes a runtime on the embedded
model under a small concurrent load, and every query of the Grafana dashboard returns data.
promtool checks the example prometheus.yml and our /metrics output."""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from runtime import GenerateRequest, Runtime, RuntimeConfig
from runtime.metrics import metrics_app
from tests.helpers import PROMPTS, greedy, require_backend, wait_until
from tests.test_metrics import fake_runtime
from tests.test_metrics_dashboard import GRAFANA, dashboard_queries

SCRAPE_INTERVAL_S = 1


def require_prometheus() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``; skip without them, except under CI=true."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus or promtool is missing under CI=true (.ci/install-prometheus)")
        pytest.skip("prometheus and promtool are not installed (run .ci/install-prometheus)")
    return prometheus, promtool


def loopback_socket() -> socket.socket:
    """A listening socket on a free 127.0.0.1 port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def serving_metrics(rt: Runtime) -> AsyncIterator[str]:
    """Serve ``metrics_app(rt)`` with uvicorn on a free loopback port; yields its host:port."""
    sock = loopback_socket()
    config = uvicorn.Config(metrics_app(rt), lifespan="off", ws="none", http="h11", log_level="warning")
    server = uvicorn.Server(config)
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            await wait_until(lambda: server.started)
            try:
                yield f"127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True


@asynccontextmanager
async def running_prometheus(binary: str, workdir: Path, target: str) -> AsyncIterator[httpx.AsyncClient]:
    """A Prometheus on a free loopback port scraping ``target`` (host:port) every second, with
    its config and data in ``workdir``; yields a client for its HTTP API (absolute URLs reach
    other servers). Stopped on leaving."""
    config = workdir / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        f"scrape_configs:\n  - job_name: slotserve\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    args = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    with (workdir / "prometheus.log").open("wb") as log:
        process = await anyio.open_process(args, stdout=log, stderr=log)
        try:
            # Building a client loads the CA bundle (about 0.1 s of blocking work): off the loop.
            client = partial(httpx.AsyncClient, base_url=f"http://127.0.0.1:{port}", timeout=10)
            async with await anyio.to_thread.run_sync(client) as api:
                with anyio.fail_after(60):
                    while True:
                        try:
                            if (await api.get("/-/ready")).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        assert process.returncode is None, (workdir / "prometheus.log").read_text()
                        await anyio.sleep(0.2)
                yield api
        finally:
            process.terminate()
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def query(api: httpx.AsyncClient, expr: str) -> list[float]:
    """The values of an instant query now."""
    response = await api.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", (expr, body)
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [float(result[1])]
    return [float(r["value"][1]) for r in result]


def promql_regex(text: str) -> str:
    """``text`` as an RE2 pattern that matches only itself, inside a PromQL string."""
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\\\1", text)


async def check_metrics_with_promtool(promtool: str, text: bytes) -> None:
    """``promtool check metrics`` must report nothing (no lint problem) on ``text``."""
    result = await anyio.run_process([promtool, "check", "metrics"], input=text, check=False)
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert report.strip() == "", report


async def test_promtool_accepts_the_example_config_and_our_metrics() -> None:
    _, promtool = require_prometheus()
    config = str(GRAFANA / "prometheus.yml")
    result = await anyio.run_process([promtool, "check", "config", config], check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert b"SUCCESS" in result.stdout + result.stderr
    reg = CollectorRegistry()
    async with fake_runtime(reg, slots=2) as rt:
        await rt.complete(greedy("hello", max_tokens=4))
        transport = httpx.ASGITransport(app=metrics_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://slotserve") as client:
            text = (await client.get("/metrics")).content
    assert b'slotserve_requests_total{model="fake",outcome="completed",reason="length"} 1.0' in text
    await check_metrics_with_promtool(promtool, text)


@pytest.mark.slow
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    """4 slots, 8 concurrent requests on the embedded model, scraped every second; then each
    PromQL expression of the dashboard, with Grafana's variables filled in, returns a number."""
    prometheus, promtool = require_prometheus()
    require_backend("llama_cpp")
    registry = CollectorRegistry()
    config = RuntimeConfig(slots=4, max_queue=8, n_ctx_per_slot=512, resize_interval_s=1.0)
    async with Runtime(config, registry=registry) as rt:
        model = rt.status().model
        async with serving_metrics(rt) as target, running_prometheus(prometheus, tmp_path, target) as api:
            selector = f'{{job="slotserve", model="{model}"}}'
            # Wait until Prometheus has scraped the request series at 0 (polling its API: no event).
            with anyio.fail_after(60):
                while not await query(api, f"slotserve_requests_total{selector}"):
                    await anyio.sleep(0.5)
            tokens: list[int] = []

            async def run(request: GenerateRequest) -> None:
                tokens.append((await rt.complete(request)).stats.completion_tokens)

            async with anyio.create_task_group() as tg:
                for i, prompt in enumerate(PROMPTS):
                    tg.start_soon(run, greedy(prompt, max_tokens=16 + 2 * i))
            text = (await api.get(f"http://{target}/metrics")).content
            await check_metrics_with_promtool(promtool, text)
            await anyio.sleep(3 * SCRAPE_INTERVAL_S)  # the finished load is scraped
            substitutions = {
                "$model": promql_regex(model),
                "$replica": ".*",  # the dashboard's "All": a runtime alone has no replica label
                "$__rate_interval": "1m",
                "$__interval": "15s",
                "$__range": "5m",
            }
            queries = dashboard_queries(substitutions)
            missing: list[tuple[str, str, list[float]]] = []
            with anyio.move_on_after(60):  # device memory appears after the Supervisor's first reading
                while True:
                    missing = []
                    for title, expr in queries:
                        values = await query(api, expr)
                        if not any(math.isfinite(v) for v in values):
                            missing.append((title, expr, values))
                    if not missing:
                        break
                    await anyio.sleep(SCRAPE_INTERVAL_S)
            completed = await query(
                api, f'sum(slotserve_requests_total{{model="{model}", outcome="completed"}})'
            )
            generated = await query(api, f"slotserve_generation_tokens_total{selector}")
            models = (await api.get("/api/v1/label/model/values")).json()["data"]
    assert not missing, [(t, v) for t, _, v in missing]
    assert len(queries) >= 40
    assert completed == [len(PROMPTS)]
    assert generated == [sum(tokens)]
    assert models == [model]  # the dashboard's model variable: label_values(..., model)
