"""Many models over HTTP (fake backends on a simulated device): routing by name on both APIs,
the listings (/api/tags, /api/ps, /v1/models), Ollama's load and unload by an empty prompt,
and a model that cannot fit answered 503 in each API's error shape with both byte counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from runtime.core.registry import ModelSpec
from runtime.runtime import Runtime
from runtime.server import create_app, serving
from tests.helpers import wait_until
from tests.model_fleet import Device, Fleet, MiB, fleet_runtime
from tests.test_server_clients import http_client

SCRIPTS = {"default": {"hi": "from the default"}, "a.gguf": {"hi": "alpha answers"}, "big.gguf": {}}


@asynccontextmanager
async def served() -> AsyncIterator[tuple[Runtime, str]]:
    fleet = Fleet(Device(10 * MiB + 2 * MiB + 150 * MiB), {"default": 10 * MiB, "a.gguf": 100 * MiB,
                  "big.gguf": 900 * MiB}, SCRIPTS)  # fmt: skip
    specs = [ModelSpec(name="a", path="a.gguf"), ModelSpec(name="big", path="big.gguf")]
    async with fleet_runtime(fleet, specs, keep_alive="-1") as rt, serving(create_app(rt)) as url:
        yield rt, url


def ps_names(body: dict[str, list[dict[str, object]]]) -> list[object]:
    return [m["name"] for m in body["models"]]


async def test_requests_route_by_name_and_the_listings_show_every_model() -> None:
    async with served() as (_, url), await http_client(url) as client:
        tags = (await client.get("/api/tags")).json()
        models = (await client.get("/v1/models")).json()
        ps_before = (await client.get("/api/ps")).json()
        body = {
            "model": "a:latest",
            "prompt": "hi",
            "raw": True,
            "stream": False,
            "options": {"temperature": 0},
        }
        ollama = (await client.post("/api/generate", json=body)).json()
        openai = (
            await client.post("/v1/completions", json={"model": "a", "prompt": "hi", "temperature": 0})
        ).json()
        default = (await client.post("/api/generate", json=body | {"model": "default"})).json()
        ps_after = (await client.get("/api/ps")).json()
        missing = await client.post("/api/generate", json=body | {"model": "/tmp/a.gguf"})
    tag_names = [m["name"] for m in tags["models"]]
    assert tag_names[-2:] == ["a:latest", "big:latest"]
    assert [m["id"] for m in models["data"]][-2:] == ["a", "big"]
    assert ps_names(ps_before) == ["fake:latest"]  # only the default is loaded before a request
    assert ollama["response"] == "alpha answers" and ollama["model"] == "a:latest"
    assert openai["choices"][0]["text"] == "alpha answers"
    assert default["response"] == "from the default"
    a = ps_after["models"][1]
    assert a["name"] == "a:latest" and a["size"] == 100 * MiB + 2 * MiB and a["slotserve"]["state"] == "ready"
    assert a["expires_at"] > "2300"  # keep_alive -1: never
    assert missing.status_code == 404


async def test_an_empty_prompt_loads_and_with_keep_alive_zero_unloads() -> None:
    async with served() as (rt, url), await http_client(url) as client:
        loaded = (await client.post("/api/generate", json={"model": "a", "prompt": ""})).json()
        ps_loaded = (await client.get("/api/ps")).json()
        unloaded = (
            await client.post("/api/generate", json={"model": "a", "prompt": "", "keep_alive": 0})
        ).json()
        await wait_until(lambda: len(rt.loaded_models()) == 1, timeout_s=5)
        ps_unloaded = (await client.get("/api/ps")).json()
    assert (loaded["done"], loaded["done_reason"]) == (True, "load")
    assert ps_names(ps_loaded) == ["fake:latest", "a:latest"]
    assert (unloaded["done"], unloaded["done_reason"]) == (True, "unload")
    assert ps_names(ps_unloaded) == ["fake:latest"]


async def test_a_model_that_cannot_fit_is_a_503_in_each_apis_shape() -> None:
    async with served() as (rt, url), await http_client(url) as client:
        with anyio.fail_after(5):
            ollama = await client.post(
                "/api/generate", json={"model": "big", "prompt": "hi", "stream": False}
            )
            openai = await client.post("/v1/chat/completions", json={"model": "big", "messages": [
                {"role": "user", "content": "hi"}]})  # fmt: skip
            health = await client.get("/health")
        loaded = [m.name for m in rt.loaded_models()]
    needed, free = f"{900 * MiB + 2 * MiB:,}", f"{150 * MiB:,}"
    assert ollama.status_code == 503 and set(ollama.json()) == {"error"}
    assert (
        f"needs {needed} bytes" in ollama.json()["error"]
        and f"{free} bytes are free" in ollama.json()["error"]
    )
    assert openai.status_code == 503
    error = openai.json()["error"]
    assert error["code"] == "insufficient_memory" and needed in error["message"] and free in error["message"]
    assert health.status_code == 200
    assert loaded == ["default"]  # nothing was evicted or loaded for it


async def test_embeddings_route_by_name_and_load_the_model() -> None:
    async with served() as (rt, url), await http_client(url) as client:
        ollama = await client.post(
            "/api/embed", json={"model": "a", "input": ["a cat", "a dog"], "dimensions": 8}
        )
        openai = await client.post("/v1/embeddings", json={"model": "a:latest", "input": "a cat"})
        loaded = [m.name for m in rt.loaded_models()]
    assert ollama.status_code == 200 and [len(v) for v in ollama.json()["embeddings"]] == [8, 8]
    assert openai.status_code == 200 and len(openai.json()["data"]) == 1
    assert loaded == ["default", "a"]


async def test_show_answers_for_a_registry_model_without_loading_it() -> None:
    async with served() as (rt, url), await http_client(url) as client:
        shown = await client.post("/api/show", json={"model": "a"})
        loaded = [m.name for m in rt.loaded_models()]
    assert shown.status_code == 200
    assert "num_ctx                        256" in shown.json()["parameters"]
    assert loaded == ["default"]
