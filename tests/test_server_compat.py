"""What apps built on the official clients ask first, on the fake backend and the embedded model:
the model endpoints (ollama list / ps / show, openai models.list / retrieve), Ollama's option
semantics, /api/version, OpenAI's error codes and system_fingerprint, the start-up requests of
Open WebUI and Continue replayed as they send them, and CORS preflights on the new routes."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import anyio
import ollama
import openai
import pytest

from runtime import Runtime
from runtime.server.versions import OLLAMA_VERSION, slotserve_version
from tests.test_server_clients import http_client, ollama_client, openai_client, served

pytestmark = pytest.mark.parametrize("kind", ["fake", "llama_cpp"])

N_CTX = 64
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A raw prompt the embedded model continues without ending (it counts on): it fills the window."""
EXPECTED = {  # what each backend's model is, as Ollama's details write it
    "fake": {"family": "fake", "format": "fake", "parameter_size": "16K", "quantization_level": "F32"},
    "llama_cpp": {"family": "llama", "format": "gguf", "parameter_size": "134.52M", "quantization_level": "Q4_1"},
}  # fmt: skip


def primary(rt: Runtime) -> str:
    """The served model's primary name: the file's name without .gguf (``fake`` on the fake)."""
    return Path(rt.backend.info.path).name.removesuffix(".gguf")


async def file_facts(rt: Runtime) -> tuple[str, int]:
    """The SHA-256 and size Ollama's listings should show: the model file's (on the fake, the
    SHA-256 of its name and the weights' bytes)."""
    if rt.config.backend == "fake":
        return hashlib.sha256(b"fake").hexdigest(), rt.backend.info.weights_bytes
    path = Path(rt.backend.info.path)
    return await anyio.to_thread.run_sync(
        lambda: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)
    )


async def test_ollama_list_ps_and_show_describe_the_model(kind: str) -> None:
    async with served(kind, slots=2, n_ctx_per_slot=N_CTX) as (rt, url), await ollama_client(url) as client:
        tags = await client.list()
        ps = await client.ps()
        shown = await client.show(f"{primary(rt)}:latest")
        by_alias = await client.show("default")
        with pytest.raises(ollama.ResponseError) as missing:
            await client.show("llama3.2:latest")
        digest, size = await file_facts(rt)
        info = rt.backend.info
    name = primary(rt)
    assert [m.model for m in tags.models] == [f"{name}:latest", "default:latest", "slotserve:latest"]
    for m in tags.models:
        assert (m.digest, m.size) == (digest, size)
        assert m.details is not None
        assert m.details.model_dump(exclude={"parent_model"}) == EXPECTED[kind] | {
            "families": [EXPECTED[kind]["family"]]
        }
        assert m.modified_at is not None
    (running,) = ps.models
    assert (running.model, running.digest, running.context_length) == (f"{name}:latest", digest, N_CTX)
    assert running.size == info.weights_bytes + 2 * info.kv_bytes_per_slot
    assert running.size_vram == (running.size if info.gpu_layers > 0 else 0)
    assert running.expires_at is not None and running.expires_at.year > 2300  # never unloaded
    assert running.details is not None and running.details.family == EXPECTED[kind]["family"]
    arch = EXPECTED[kind]["family"]
    assert (
        shown.details is not None and shown.details.quantization_level == EXPECTED[kind]["quantization_level"]
    )
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == arch
    assert (
        shown.modelinfo[f"{arch}.context_length"]
        == info.n_ctx_train
        == (8192 if kind == "llama_cpp" else N_CTX)
    )
    assert shown.modelinfo[f"{arch}.block_count"] == info.n_layer == (30 if kind == "llama_cpp" else 1)
    assert shown.modelinfo[f"{arch}.embedding_length"] == (576 if kind == "llama_cpp" else 64)
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []  # long arrays are left empty unless verbose
    assert "general.name" not in shown.modelinfo and "tokenizer.chat_template" not in shown.modelinfo
    if kind == "llama_cpp":
        assert shown.modelinfo["general.parameter_count"] == 134_515_008
        assert shown.modelinfo["llama.attention.layer_norm_rms_epsilon"] == 1e-05
        assert shown.license == "apache-2.0"
    assert (
        shown.template is not None
        and ("<|im_start|>" if kind == "llama_cpp" else "<assistant>") in shown.template
    )
    assert shown.capabilities == ["completion", "tools", "embedding"]
    assert shown.parameters is not None and shown.parameters.splitlines()[0].split() == [
        "num_ctx",
        str(N_CTX),
    ]
    assert shown.modified_at is not None and shown.modified_at.tzinfo is not None
    assert by_alias.modelinfo == shown.modelinfo
    assert missing.value.status_code == 404 and "'llama3.2:latest' not found" in missing.value.error


async def test_openai_models_list_and_retrieve(kind: str) -> None:
    async with served(kind, slots=1, n_ctx_per_slot=N_CTX) as (rt, url), await openai_client(url) as client:
        listed = await client.models.list()
        named = await client.models.retrieve(primary(rt))
        alias = await client.models.retrieve("slotserve:latest")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("gpt-4o")
    assert [m.id for m in listed.data] == [primary(rt)]
    assert (named.id, named.object, named.owned_by) == (primary(rt), "model", "slotserve")
    assert named.model_extra is not None and "tools" in named.model_extra["capabilities"]
    assert alias.id == "slotserve:latest" and alias.created == named.created == listed.data[0].created
    assert missing.value.status_code == 404
    assert missing.value.code == "model_not_found"
    assert isinstance(missing.value.body, dict) and "'gpt-4o' not found" in missing.value.body["message"]


async def test_ollama_options_adapt_as_ollama_does(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """num_ctx 32768 and num_predict 4096 (Continue's defaults) on a 64-token slot: 200, and
    the answer stops when the window is full (done_reason length; the counts say what was used);
    an unknown option is ignored; each is logged once however often it comes."""
    opts = {"temperature": 0, "num_ctx": 32768, "num_predict": 4096, "warp": 9}
    with caplog.at_level(logging.WARNING, logger="slotserve.server"):
        async with (
            served(kind, slots=1, n_ctx_per_slot=N_CTX) as (_, url),
            await ollama_client(url) as client,
        ):
            full = await client.generate(
                model="slotserve", prompt=COUNTING, raw=True, options=opts, keep_alive="5m"
            )
            again = await client.generate(
                model="slotserve", prompt=COUNTING, raw=True, options=opts, keep_alive=-1
            )
            small = await client.generate(
                model="slotserve", prompt=COUNTING, raw=True, options=opts | {"num_predict": 5}
            )
            talk = await client.chat(model="default:latest", messages=[{"role": "user", "content": "Count."}],
                                     options=opts, keep_alive=300)  # fmt: skip
            with pytest.raises(ollama.ResponseError) as bad_keep_alive:
                await client.generate(model="slotserve", prompt="x", keep_alive="soon")
    assert (full.done_reason, again.response) == ("length", full.response)
    assert full.prompt_eval_count is not None and full.eval_count is not None
    assert full.prompt_eval_count + full.eval_count == N_CTX  # the whole window, then it stopped
    assert (small.done_reason, small.eval_count) == ("length", 5)
    assert talk.done_reason in ("length", "stop") and talk.prompt_eval_count + (talk.eval_count or 0) <= N_CTX
    assert bad_keep_alive.value.status_code == 400 and "keep_alive is 'soon'" in bad_keep_alive.value.error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings.count("options.'warp' is not an Ollama option; ignored (as Ollama does)") == 1
    clamped = (
        f"options.num_ctx is 32,768; each slot holds {N_CTX} tokens (n_ctx_per_slot), so {N_CTX} are used"
    )
    assert warnings.count(clamped) == 1


async def test_openai_stays_strict_and_fingerprints_its_answers(kind: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "Hi"}]
    async with served(kind, slots=1, n_ctx_per_slot=N_CTX) as (_, url), await openai_client(url) as client:
        with pytest.raises(openai.BadRequestError) as over_window:
            await client.chat.completions.create(model="slotserve", messages=messages, max_tokens=4096)
        with pytest.raises(openai.BadRequestError) as over_room:
            await client.completions.create(model="slotserve", prompt=COUNTING, max_tokens=60, stream=True)
        with pytest.raises(openai.BadRequestError) as long_prompt:
            await client.completions.create(model="slotserve", prompt="word " * 200, max_tokens=4)
        chat = await client.chat.completions.create(model="slotserve", messages=messages, max_tokens=4)
        text = await client.completions.create(model="slotserve", prompt=COUNTING, max_tokens=4)
        chunks = [c async for c in await client.chat.completions.create(
            model="slotserve", messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True},
        )]  # fmt: skip
    for refused in (over_window, over_room, long_prompt):
        assert refused.value.status_code == 400
        assert refused.value.code == "context_length_exceeded"
        assert f"slot context is {N_CTX} tokens" in refused.value.message
    assert "max_tokens is 4,096" in over_window.value.message
    assert "max_tokens is 60" in over_room.value.message
    fingerprint = chat.system_fingerprint
    assert fingerprint is not None and re.fullmatch(r"fp_[0-9a-f]{12}", fingerprint)
    assert text.system_fingerprint == fingerprint
    assert [c.system_fingerprint for c in chunks] == [fingerprint] * len(chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_open_webui_and_continue_start_up_as_they_do(kind: str) -> None:
    """Their first requests, replayed as they send them (httpx): then they can generate."""
    async with served(kind, slots=1, n_ctx_per_slot=N_CTX) as (rt, url), await http_client(url) as client:
        # Open WebUI: the version (it wants >= 0.1.16), the models, one model's details, a chat
        got_version = await client.get("/api/version")
        tags = (await client.get("/api/tags")).json()
        name = tags["models"][0]["name"]
        webui_show = await client.post("/api/show", json={"model": name})
        webui_chat = await client.post("/api/chat", json={
            "model": name, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
            "options": {"temperature": 0, "num_predict": 3}, "keep_alive": "5m",
        })  # fmt: skip
        # Continue: /api/show with the older "name", then a raw completion with its defaults
        continue_show = (await client.post("/api/show", json={"name": "default"})).json()
        legacy_show = (await client.get("/api/show", params={"name": "slotserve"})).json()
        continue_generate = await client.post("/api/generate", json={
            "model": "default", "prompt": COUNTING, "raw": True, "stream": False, "keep_alive": 1800,
            "options": {"temperature": 0, "num_ctx": 8192, "num_predict": 4096, "stop": ["\n\n"]},
        })  # fmt: skip
        head_tags = await client.head("/api/tags")
    assert got_version.json() == {"version": OLLAMA_VERSION, "slotserve_version": slotserve_version()}
    assert tuple(int(p) for p in got_version.json()["version"].split(".")) >= (0, 1, 16)
    assert name == f"{primary(rt)}:latest"
    assert (
        webui_show.status_code == 200 and webui_show.json()["details"]["family"] == EXPECTED[kind]["family"]
    )
    assert webui_chat.status_code == 200 and webui_chat.json()["eval_count"] == 3
    assert webui_chat.json()["message"]["role"] == "assistant"
    params = {}
    for line in continue_show["parameters"].split("\n"):  # Continue's own pattern
        if m := re.match(r'^(\S+)\s+((?:".*")|\S+)$', line):
            params[m.group(1)] = m.group(2)
    assert int(params["num_ctx"]) == N_CTX  # so Continue sizes its prompts to the slot
    assert float(params["temperature"]) == 0.8
    context = [v for k, v in continue_show["model_info"].items() if k.endswith(".context_length")]
    assert context == [rt.backend.info.n_ctx_train]
    assert ".Suffix" not in continue_show["template"]  # Continue reads this as "no fill-in-the-middle"
    assert legacy_show == continue_show
    body = continue_generate.json()
    assert continue_generate.status_code == 200 and body["done_reason"] in ("length", "stop")
    assert body["prompt_eval_count"] + body["eval_count"] <= N_CTX
    assert head_tags.status_code == 200


async def test_new_routes_answer_preflights_and_errors_in_the_apis_shape(kind: str) -> None:
    local = {"origin": "http://localhost:3000"}
    async with served(kind, slots=1, n_ctx_per_slot=N_CTX) as (_, url), await http_client(url) as client:
        preflights = [
            await client.options(path, headers=local | {"access-control-request-method": method,
                                                        "access-control-request-headers": "content-type"})
            for path, method in (("/api/show", "POST"), ("/v1/models/slotserve", "GET"), ("/api/version", "GET"))
        ]  # fmt: skip
        shown = await client.post("/api/show", json={"model": "slotserve"}, headers=local)
        wrong_method = await client.delete("/api/show")
        no_model = await client.post("/api/show", json={})
        unknown = await client.get("/v1/models/nope")
        version_time = dt.datetime.now(dt.UTC)
        ps = (await client.get("/api/ps")).json()
    for answer in preflights:
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == local["origin"]
    assert shown.status_code == 200 and shown.headers["access-control-allow-origin"] == local["origin"]
    assert wrong_method.status_code == 405 and "method not allowed" in wrong_method.json()["error"]
    assert no_model.status_code == 400 and no_model.json() == {
        "error": "model is required; give it as model (or name)"
    }
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert unknown.json()["error"]["type"] == "invalid_request_error"
    expires = dt.datetime.fromisoformat(ps["models"][0]["expires_at"])
    assert expires - version_time > dt.timedelta(days=365 * 290)
    assert ps["models"][0]["slotserve"]["slots_effective"] == 1
