"""slotserve on Ray Serve (runtime.ray_serve): one local Ray for the module (logical CPUs, fake
GPUs, HTTP on loopback), fake-backend replicas whose steps take 20 ms, then the embedded model
in two replicas.

The tests run in order on one application that each redeploys as it needs (routing scales 1 ->
2, the failure test kills a replica and waits for its replacement, the drain scales 2 -> 1).
Without Ray they skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from runtime.core.config import RuntimeConfig
from runtime.core.errors import ContextOverflowError, QueueFullError, RuntimeClosedError
from runtime.core.messages import Chunk, GenerateRequest
from tests.helpers import require_backend

with warnings.catch_warnings():  # Ray's pydantic models warn as they are defined
    warnings.simplefilter("ignore")
    try:
        import ray
        from ray import serve
    except ImportError:  # the ray extra is not installed: under CI=true that is a failure
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("ray[serve] (the ray extra) is not installed", allow_module_level=True)

    from runtime.ray_serve.application import app_builder, build_app
    from runtime.ray_serve.router import rank
    from runtime.ray_serve.wire import EngineOptions, WireError, error_from_wire, error_to_wire

ROOT = Path(__file__).resolve().parent.parent
APP = "slotserve"
STEP_S = 0.02
FAKE = RuntimeConfig(backend="fake", slots=2, max_queue=4, n_ctx_per_slot=512)
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """A local Ray with Serve's proxy on a free loopback port; its base URL."""
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # a short path: Ray's sockets live there
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, object_store_memory=100 << 20,
             _node_ip_address="127.0.0.1", _temp_dir=temp, log_to_driver=False)  # fmt: skip
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


def health(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/health", timeout=10).json()
    return body


def wait_for(url: str, what: str, check: Any, timeout_s: float = 60) -> dict[str, Any]:
    """Poll /health until ``check(body)`` holds; the body."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            body = health(url)
            if check(body):
                return body
        except httpx.HTTPError:
            body = {}
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s; last /health {body}")
        time.sleep(0.2)


def ready_replicas(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in body.get("replicas", []) if r["state"] == "ready"]


def deploy(
    url: str, replicas: int, config: RuntimeConfig = FAKE, faults: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run the application with ``replicas`` Engine replicas and wait until /health lists them."""
    options = EngineOptions(
        config=config, fake_step_delay_s=STEP_S, fake_fault_prompts=faults, report_period_s=0.5
    )
    version = hashlib.sha256(msgspec.json.encode(options)).hexdigest()[:16]  # scale without restarts
    app = build_app(
        options, replicas=replicas, cpus_per_replica=0.1, health_check_period_s=2.0, version=version
    )
    serve.run(app, name=APP, route_prefix="/")
    return wait_for(url, f"{replicas} ready replicas", lambda b: len(ready_replicas(b)) == replicas)


def admitted(url: str) -> dict[str, int]:
    """Each replica's admitted count, once the reports are fresh (a report period is 0.5 s)."""
    time.sleep(1.2)
    return {r["id"]: r["admitted"] for r in health(url)["replicas"]}


def ollama(prompt: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": "fake", "prompt": prompt, "stream": stream, "options": {"num_predict": max_tokens}}


async def ndjson(
    client: httpx.AsyncClient, body: dict[str, Any], first: asyncio.Event | None = None
) -> list[Any]:
    """A streamed /api/generate: its status and frames; ``first`` is set at the first frame."""
    frames: list[Any] = []
    async with client.stream("POST", "/api/generate", json=body) as response:
        frames.append(response.status_code)
        async for line in response.aiter_lines():
            if line:
                frames.append(json.loads(line))
                if first is not None:
                    first.set()
    return frames


@pytest.fixture
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        yield c


# -- without a cluster ---------------------------------------------------------------------


class _Replica:
    def __init__(self, name: str, stats: dict[str, Any]) -> None:
        self.name, self.routing_stats = name, stats


def _stats(free: int, queue: int, pressure: bool = False, ready: bool = True) -> dict[str, Any]:
    return {"free_slots": free, "queue_depth": queue, "queue_capacity": 4, "slots": 2,
            "memory_pressure": pressure, "ready": ready}  # fmt: skip


def test_rank_puts_free_slots_first_and_memory_pressure_last() -> None:
    replicas = [
        _Replica("full", _stats(0, 4)), _Replica("pressed", _stats(2, 0, pressure=True)),
        _Replica("queued", _stats(0, 1)), _Replica("one", _stats(1, 0)), _Replica("new", {}),
        _Replica("two", _stats(2, 0)), _Replica("queued3", _stats(0, 3)),
    ]  # fmt: skip
    tiers = [[r.name for r in tier] for tier in rank(replicas)]  # type: ignore[arg-type, attr-defined]
    assert tiers == [["two", "one", "new"], ["queued", "queued3"], ["full"], ["pressed"]]


def test_errors_cross_as_data_with_their_fields() -> None:
    back = error_from_wire(error_to_wire(ContextOverflowError(600, 20, 512)))
    assert isinstance(back, ContextOverflowError)
    assert (back.prompt_tokens, back.max_tokens, back.n_ctx_per_slot) == (600, 20, 512)
    assert str(back) == str(ContextOverflowError(600, 20, 512))
    other = error_from_wire(error_to_wire(KeyError("x")))
    assert type(other).__name__ == "GenerationError" and "KeyError" in str(other)
    assert isinstance(error_from_wire(WireError(kind="NoSuchError", message="m")), Exception)


def test_the_router_loads_no_backend() -> None:
    """It is pickled into every caller (the Ingress, Serve's proxy): no llama_cpp, no actors."""
    code = "import sys, runtime.ray_serve.router; print(sorted(m for m in sys.modules if m.startswith(('llama_cpp', 'runtime.backends.llama', 'actors'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_app_builder_reads_a_serve_config_and_refuses_unknown_keys() -> None:
    app = app_builder({"replicas": 2, "config": {"backend": "fake", "slots": 3}, "cpus_per_replica": 0.5})
    assert type(app).__name__ == "Application"
    with pytest.raises(Exception, match="replica"):
        app_builder({"replica": 2})


# -- on the cluster ------------------------------------------------------------------------


async def test_busy_replica_gets_no_new_requests_and_a_cancel_frees_its_slots(
    url: str, client: httpx.AsyncClient
) -> None:
    first_id = (await asyncio.to_thread(deploy, url, 1))["replicas"][0]["id"]
    started = [asyncio.Event(), asyncio.Event()]
    long = [
        asyncio.create_task(ndjson(client, ollama(f"long {i}", 400, stream=True), started[i]))
        for i in range(2)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
    body = await asyncio.to_thread(deploy, url, 2)
    other_id = next(r["id"] for r in body["replicas"] if r["id"] != first_id)
    await asyncio.to_thread(wait_for, url, "the first replica busy", lambda b: any(
        r["id"] == first_id and r["busy"] == 2 for r in b["replicas"]))  # fmt: skip
    before = await asyncio.to_thread(admitted, url)
    short = await asyncio.gather(*(client.post("/api/generate", json=ollama(f"s{i}", 4)) for i in range(6)))
    assert [r.status_code for r in short] == [200] * 6
    assert all(r.json()["eval_count"] == 4 for r in short)
    after = await asyncio.to_thread(admitted, url)
    assert after[other_id] - before.get(other_id, 0) == 6  # all on the replica with free slots
    assert after[first_id] - before[first_id] == 0
    for task in long:  # the client goes away: its slots free at the next step, not in 8 s
        task.cancel()
    await asyncio.to_thread(wait_for, url, "the cancelled slots freed", lambda b: all(
        r["busy"] == 0 for r in b["replicas"]), timeout_s=5)  # fmt: skip


async def test_40_concurrent_over_2_replicas_of_2_slots_and_4_queued(
    url: str, client: httpx.AsyncClient
) -> None:
    body = await asyncio.to_thread(deploy, url, 2)
    assert body["slots"] == 4
    before = await asyncio.to_thread(admitted, url)

    async def one(i: int) -> httpx.Response:
        if i % 2:
            chat = {"model": "fake", "messages": [{"role": "user", "content": f"r{i}"}], "max_tokens": 150}
            return await client.post("/v1/chat/completions", json=chat)
        return await client.post("/api/generate", json=ollama(f"r{i}", 150))

    answers = await asyncio.gather(*(one(i) for i in range(40)))
    served = [(i, r) for i, r in enumerate(answers) if r.status_code == 200]
    refused = [(i, r) for i, r in enumerate(answers) if r.status_code == 503]
    others = [(r.status_code, r.text[:200]) for r in answers if r.status_code not in (200, 503)]
    assert (len(served), len(refused), others) == (12, 28, [])
    for i, r in served:
        tokens = r.json()["usage"]["completion_tokens"] if i % 2 else r.json()["eval_count"]
        assert tokens == 150
    for i, r in refused:
        assert r.headers["retry-after"] == "1"
        error = r.json()["error"]
        if i % 2:
            assert error["code"] == "queue_full" and error["type"] == "server_error"
        else:
            assert isinstance(error, str) and "busy" in error
    after = await asyncio.to_thread(admitted, url)
    assert sum(after.values()) - sum(before.values()) == 12  # none lost, none served twice


async def test_a_killed_replica_fails_its_streams_in_band_and_its_queue_moves_to_the_other(
    url: str, client: httpx.AsyncClient
) -> None:
    body = await asyncio.to_thread(deploy, url, 2)
    ids = {r["id"] for r in body["replicas"]}
    tasks = [asyncio.create_task(ndjson(client, ollama(f"k{i}", 120, stream=True))) for i in range(8)]
    victim = await asyncio.to_thread(wait_for, url, "both replicas busy", lambda b: all(
        r["busy"] == 2 for r in b["replicas"]) and sum(r["queue"] for r in b["replicas"]) == 4)  # fmt: skip
    victim_id = victim["replicas"][0]["id"]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Engine#{victim_id}", namespace="serve"), no_restart=True)
    results = await asyncio.gather(*tasks)
    assert all(frames[0] == 200 for frames in results)
    ended = [frames for frames in results if frames[-1].get("done")]
    failed = [frames for frames in results if "error" in frames[-1]]
    assert (len(ended), len(failed)) == (6, 2)  # the victim's 2 running; its 2 queued ran on the other
    assert all(f[-1]["eval_count"] == 120 for f in ended)
    assert all(len(f) > 2 and "went away" in f[-1]["error"] for f in failed)  # after some text
    body = await asyncio.to_thread(wait_for, url, "a replacement replica", lambda b: len(ready_replicas(b)) == 2
                                   and victim_id not in {r["id"] for r in b["replicas"]}, timeout_s=90)  # fmt: skip
    (new_id,) = {r["id"] for r in body["replicas"]} - ids
    before = await asyncio.to_thread(admitted, url)
    answers = await asyncio.gather(
        *(client.post("/api/generate", json=ollama(f"n{i}", 30)) for i in range(8))
    )
    assert [r.status_code for r in answers] == [200] * 8
    after = await asyncio.to_thread(admitted, url)
    assert after[new_id] - before.get(new_id, 0) > 0  # the replacement takes traffic


async def test_n_choices_over_the_replicas_each_with_its_index(url: str, client: httpx.AsyncClient) -> None:
    await asyncio.to_thread(deploy, url, 2)
    before = await asyncio.to_thread(admitted, url)
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "n": 3,
            "temperature": 0.9, "seed": 5}  # fmt: skip
    whole = await client.post("/v1/chat/completions", json=chat)
    assert whole.status_code == 200, whole.text
    choices = whole.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert all(c["message"]["content"] for c in choices) and whole.json()["usage"]["completion_tokens"] == 18
    async with client.stream("POST", "/v1/chat/completions", json={**chat, "n": 2, "stream": True}) as r:
        assert r.status_code == 200
        lines = [
            json.loads(x[6:]) for x in [line async for line in r.aiter_lines()] if x.startswith("data: {")
        ]
    assert {c["index"] for line in lines for c in line["choices"]} == {0, 1}
    too_many = await client.post("/v1/chat/completions", json={**chat, "n": 5})  # 4 slots in all
    assert too_many.status_code == 400 and "n is 5" in too_many.json()["error"]["message"]
    after = await asyncio.to_thread(admitted, url)
    assert sum(after.values()) - sum(before.values()) == 5  # 3 + 2 calls to the replicas


async def test_scaling_2_to_1_loses_no_request_in_flight(url: str, client: httpx.AsyncClient) -> None:
    await asyncio.to_thread(deploy, url, 2)
    tasks = [asyncio.create_task(ndjson(client, ollama(f"d{i}", 100, stream=True))) for i in range(10)]
    await asyncio.to_thread(
        wait_for, url, "every replica busy", lambda b: all(r["busy"] == 2 for r in b["replicas"])
    )
    await asyncio.to_thread(deploy, url, 1)
    results = await asyncio.gather(*tasks)
    assert [f[0] for f in results] == [200] * 10
    assert [f[-1].get("eval_count") for f in results] == [100] * 10, [f[-1] for f in results]
    assert len(health(url)["replicas"]) == 1


async def test_metrics_label_every_replica_and_ps_lists_them(url: str, client: httpx.AsyncClient) -> None:
    body = await asyncio.to_thread(deploy, url, 2)
    ids = sorted(r["id"] for r in body["replicas"])
    text = (await client.get("/metrics")).text
    slots = [line for line in text.splitlines() if line.startswith("slotserve_slots_effective{")]
    assert sorted(line.split('replica="')[1].split('"')[0] for line in slots) == ids
    assert sum(float(line.rsplit(" ", 1)[1]) for line in slots) == 4
    ps = (await client.get("/api/ps")).json()["models"][0]["slotserve"]
    assert sorted(r["id"] for r in ps["replicas"]) == ids and ps["slots_effective"] == 4
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}
    too_long = await client.post("/v1/chat/completions", json=chat)  # refused by a replica, as data
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert "512 tokens" in too_long.json()["error"]["message"]


async def test_a_failed_runtime_fails_its_health_check_and_its_replica_is_replaced(
    url: str, client: httpx.AsyncClient
) -> None:
    config = msgspec.structs.replace(FAKE, restart_intensity=0)  # one slot crash fails the runtime
    body = await asyncio.to_thread(deploy, url, 2, config, ("boom",))
    ids = {r["id"] for r in body["replicas"]}
    crash = await client.post("/api/generate", json={**ollama("boom", 10), "raw": True})
    assert crash.status_code in (500, 503) and "failed" in crash.json()["error"]  # slot or runtime
    body = await asyncio.to_thread(wait_for, url, "a failed replica", lambda b: any(
        r["state"] == "failed" for r in b["replicas"]))  # fmt: skip
    failed = next(r["id"] for r in body["replicas"] if r["state"] == "failed")
    answers = await asyncio.gather(*(client.post("/api/generate", json=ollama(f"f{i}", 5)) for i in range(6)))
    assert [r.status_code for r in answers] == [200] * 6  # the other replica (or a retry) serves
    body = await asyncio.to_thread(wait_for, url, "the failed replica replaced", lambda b: len(ready_replicas(b)) == 2
                                   and failed not in {r["id"] for r in b["replicas"]}, timeout_s=90)  # fmt: skip
    assert len({r["id"] for r in body["replicas"]} - ids) == 1


def test_an_engine_replica_takes_a_gpu_where_the_layers_go_to_one(url: str) -> None:
    from runtime.ray_serve.application import gpus_per_replica

    assert ray.cluster_resources().get("GPU") == 2  # type: ignore[no-untyped-call]  # the fixture's fake GPUs
    assert gpus_per_replica(RuntimeConfig(n_gpu_layers=-1)) == 1.0
    assert gpus_per_replica(RuntimeConfig(n_gpu_layers=0)) == 0.0
    assert gpus_per_replica(RuntimeConfig(backend="fake")) == 0.0


def test_backpressure_reads_as_queue_full_naming_the_limit() -> None:
    from ray.serve.exceptions import BackPressureError

    from runtime.ray_serve.stream import backpressure_error

    error = backpressure_error(BackPressureError(num_queued_requests=6, max_queued_requests=6))
    assert isinstance(error, QueueFullError) and "max_queued_requests=6" in str(error)


async def test_a_call_refused_by_serve_back_pressure_reads_as_queue_full_and_is_released() -> None:
    """Serve's ``cancel`` on a call whose assignment failed raises that failure again (it
    fetches the result); closing the stream must not turn the 503 into a 500."""
    from ray.serve.exceptions import BackPressureError

    from runtime.ray_serve.stream import RemoteStream

    refusal = BackPressureError(num_queued_requests=6, max_queued_requests=6)

    class RefusedCall:
        cancels = 0

        async def __anext__(self) -> Any:
            raise refusal

        def cancel(self) -> None:
            RefusedCall.cancels += 1
            raise refusal

    class Source:
        retries, released = 2, 0

        def stream_call(self, request: Any) -> Any:
            return RefusedCall()

        def release(self) -> None:
            self.released += 1

    source = Source()
    stream = RemoteStream(source, GenerateRequest(prompt="p", max_tokens=3))
    with pytest.raises(QueueFullError, match="max_queued_requests=6"):
        await stream.__anext__()
    assert (source.released, RefusedCall.cancels, stream.tries) == (1, 1, 1)  # not retried, released once
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    assert source.released == 1


class _Calls:
    """A StreamSource whose calls answer, in turn, as ``answers`` say: an exception to raise,
    or a list of items (WireErrors, chunk batches) to yield."""

    retries = 3

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls = self.released = 0

    def stream_call(self, request: Any) -> Any:
        answer = self.answers[self.calls]
        self.calls += 1

        async def call() -> Any:
            if isinstance(answer, BaseException):
                raise answer
            for item in answer:
                yield item

        return call()

    def release(self) -> None:
        self.released += 1


def _given_back_then_full() -> list[Any]:
    from ray.serve.exceptions import BackPressureError

    from runtime.ray_serve.wire import error_to_wire

    done = Chunk(text="hi", token_ids=(1,), done=True, done_reason="stop")
    return [
        [error_to_wire(RuntimeClosedError("the server is shutting down"))],  # its replica drains
        BackPressureError(num_queued_requests=4, max_queued_requests=4),  # the other one is full
        [error_to_wire(QueueFullError(4))],  # and its mailbox too
        [[done]],
    ]


async def test_a_request_given_back_by_a_draining_replica_waits_for_room_on_another() -> None:
    """A scale-down gives back the requests queued on the replica that goes; one that then
    meets a full replica waits for room (MOVED_WAIT_S) instead of turning into a 503."""
    from runtime.ray_serve.stream import RemoteStream

    source = _Calls(_given_back_then_full())
    async with RemoteStream(source, GenerateRequest(prompt="p", max_tokens=3)) as stream:
        chunks = [chunk async for chunk in stream]
    assert [c.text for c in chunks] == ["hi"] and chunks[-1].done
    assert (source.calls, source.released, stream.tries) == (4, 1, 2)  # the waits for room are no tries


async def test_a_request_given_back_is_refused_once_its_wait_for_room_is_spent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runtime.ray_serve import stream as stream_module

    monkeypatch.setattr(stream_module, "MOVED_WAIT_S", -1.0)
    source = _Calls(_given_back_then_full())
    stream = stream_module.RemoteStream(source, GenerateRequest(prompt="p", max_tokens=3))
    with pytest.raises(QueueFullError, match="max_queued_requests=4"):
        await stream.__anext__()
    assert (source.calls, source.released) == (2, 1)


async def test_a_request_given_back_is_not_held_for_a_deadline_it_cannot_meet() -> None:
    """A deadline refusal is no full replica: waiting for room would only make it later."""
    from runtime.core.errors import DeadlineUnmetError
    from runtime.ray_serve.stream import RemoteStream
    from runtime.ray_serve.wire import error_to_wire

    answers = _given_back_then_full()
    answers[1] = [error_to_wire(DeadlineUnmetError(100.0, 900.0, 0.8))]
    source = _Calls(answers)
    stream = RemoteStream(source, GenerateRequest(prompt="p", max_tokens=3, deadline_ms=100.0))
    with pytest.raises(DeadlineUnmetError):
        await stream.__anext__()
    assert (source.calls, source.released) == (2, 1)


async def test_the_embedded_model_in_two_replicas(url: str, client: httpx.AsyncClient) -> None:
    require_backend("llama_cpp")
    config = RuntimeConfig(slots=2, max_queue=4, n_ctx_per_slot=512, threads=1)
    body = await asyncio.to_thread(deploy, url, 2, config)
    assert len(body["replicas"]) == 2
    name = body["model"]
    chats = [{"model": name, "messages": [{"role": "user", "content": "Name a colour."}], "stream": False,
              "options": {"temperature": 0, "num_predict": 8}} for _ in range(4)]  # fmt: skip
    answers = await asyncio.gather(*(client.post("/api/chat", json=c) for c in chats))
    texts = {r.json()["message"]["content"] for r in answers}
    assert [r.status_code for r in answers] == [200] * 4 and len(texts) == 1 and texts != {""}
    after = await asyncio.to_thread(admitted, url)
    assert sum(after.values()) == 4
    embed = await client.post("/api/embed", json={"model": name, "input": ["a", "b"]})
    assert embed.status_code == 200 and len(embed.json()["embeddings"]) == 2
