"""The embedding endpoints driven by the real clients against a running server, on the fake
backend and the embedded model: ollama's embed and embeddings, openai's embeddings.create
(float and base64), LangChain's OllamaEmbeddings; the vectors equal rt.embed's, and bad input
gets a 400 in each API's shape while the server keeps serving."""

from __future__ import annotations

import base64
import importlib
from typing import Any

import anyio
import numpy as np
import ollama
import pytest

from runtime import EmbedRequest
from runtime.server import create_app, serving
from tests.helpers import open_runtime, require_modules
from tests.test_server_clients import MODEL, http_client, ollama_client, openai_client, served

BOTH = pytest.mark.parametrize("kind", ["fake", "llama_cpp"])
"""The backends that embed (ctransformers does not)."""

TEXTS = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock markets fell sharply."]


def close(a: Any, b: Any) -> bool:
    return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=1e-6))


@BOTH
async def test_ollama_client_embed_and_embeddings_equal_the_embedded_api(kind: str) -> None:
    async with served(kind, slots=2) as (rt, url), await ollama_client(url) as client:
        many = await client.embed(model=MODEL, input=TEXTS)
        one = await client.embed(model=MODEL, input=TEXTS[0], dimensions=32)
        legacy = await client.embeddings(model=MODEL, prompt=TEXTS[0])
        empty = await client.embed(model=MODEL, input=[])
        want = await rt.embed(TEXTS)
        want_cut = await rt.embed(TEXTS[0], dimensions=32)
        raw = await rt.embed(EmbedRequest(inputs=(TEXTS[0],), normalize=False))
        shown = await client.show(MODEL)
    assert many.model == MODEL and len(many.embeddings) == 3
    assert all(close(got, w) for got, w in zip(many.embeddings, want.vectors, strict=True))
    assert many.prompt_eval_count == want.prompt_tokens
    assert many.total_duration is not None and many.total_duration > 0
    assert len(one.embeddings[0]) == 32 and close(one.embeddings[0], want_cut.vectors[0])
    assert close(legacy.embedding, raw.vectors[0])  # Ollama's legacy endpoint: not normalised
    assert empty.embeddings == []
    assert shown.capabilities is not None and "embedding" in shown.capabilities


@BOTH
async def test_openai_client_embeddings_float_and_base64(kind: str) -> None:
    async with served(kind, slots=2) as (rt, url), await openai_client(url) as client:
        floats = await client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
        by_default = await client.embeddings.create(model=MODEL, input=TEXTS[0])  # the client asks base64
        tokens = rt.backend.tokenize(TEXTS[0], add_special=True, parse_special=False)
        by_tokens = await client.embeddings.create(model=MODEL, input=[tokens], dimensions=16)
        want = await rt.embed(TEXTS)
        want_cut = await rt.embed(TEXTS[0], dimensions=16)
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.object == "list"
    assert all(close(d.embedding, w) for d, w in zip(floats.data, want.vectors, strict=True))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == want.prompt_tokens
    assert close(by_default.data[0].embedding, want.vectors[0])
    assert len(by_tokens.data[0].embedding) == 16 and close(by_tokens.data[0].embedding, want_cut.vectors[0])


@BOTH
async def test_base64_is_little_endian_float32(kind: str) -> None:
    async with served(kind, slots=1) as (rt, url), await http_client(url) as http:
        answer = await http.post(
            "/v1/embeddings", json={"model": MODEL, "input": "hello", "encoding_format": "base64"}
        )
        want = await rt.embed("hello")
    encoded = answer.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert np.array_equal(
        np.frombuffer(base64.b64decode(encoded), dtype="<f4"), np.asarray(want.vectors[0], dtype=np.float32)
    )


@BOTH
async def test_bad_input_gets_a_400_in_each_apis_shape_and_the_server_keeps_serving(kind: str) -> None:
    long = "word " * 400
    async with served(kind, slots=1, n_ctx_per_slot=64) as (_rt, url), await http_client(url) as http:
        ollama_bad = [
            {"model": MODEL, "input": [1, 2]},
            {"model": MODEL, "input": ["ok", ""]},
            {"model": MODEL, "input": long, "truncate": False},
            {"model": MODEL, "input": "x", "dimensions": -1},
            {"model": MODEL, "input": {"text": "x"}},
        ]
        openai_bad = [
            {"model": MODEL, "input": []},
            {"model": MODEL, "input": ""},
            {"model": MODEL, "input": [["a"]]},
            {"model": MODEL, "input": [1, "a"]},
            {"model": MODEL, "input": [[1, 2], []]},
            {"model": MODEL, "input": [10**9]},
            {"model": MODEL, "input": "x", "encoding_format": "int8"},
            {"model": MODEL, "input": "x", "dimensions": 100_000},
        ]
        answers = [await http.post("/api/embed", json=b) for b in ollama_bad]
        legacy = await http.post("/api/embeddings", json={"model": MODEL, "prompt": 3})
        oa = [await http.post("/v1/embeddings", json=b) for b in openai_bad]
        too_long = await http.post("/v1/embeddings", json={"model": MODEL, "input": long})
        truncated = await http.post("/api/embed", json={"model": MODEL, "input": long})
        still = await http.post("/api/embed", json={"model": MODEL, "input": "fine"})
        unknown = await http.post("/api/embed", json={"model": "llama3:latest", "input": "x"})
    for a in [*answers, legacy]:
        assert a.status_code == 400, a.text
        assert set(a.json()) == {"error"} and a.json()["error"]
    assert "slot context is 64" in answers[2].json()["error"]
    for a in oa:
        assert a.status_code == 400, a.text
        error = a.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert truncated.status_code == 200 and truncated.json()["prompt_eval_count"] == 64
    assert still.status_code == 200 and len(still.json()["embeddings"]) == 1
    assert unknown.status_code == 404


async def test_a_model_without_embeddings_answers_400_in_each_shape() -> None:
    """The fake stands for a backend without embeddings."""
    async with (
        open_runtime("fake", slots=1, fake={"embeddings": False}) as rt,
        serving(create_app(rt)) as url,
        await http_client(url) as http,
        await ollama_client(url) as client,
    ):
        ollama_answer = await http.post("/api/embed", json={"model": MODEL, "input": "x"})
        openai_answer = await http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        with pytest.raises(ollama.ResponseError) as raised:
            await client.embed(model=MODEL, input="x")
        shown = await client.show(MODEL)
    assert ollama_answer.status_code == 400 and "does not support embeddings" in ollama_answer.json()["error"]
    assert openai_answer.json()["error"]["code"] == "embeddings_unsupported"
    assert raised.value.status_code == 400
    assert shown.capabilities == ["completion", "tools"]


@BOTH
async def test_8_concurrent_http_requests_share_decodes(kind: str) -> None:
    async with served(kind, slots=2) as (rt, url), await openai_client(url) as client:
        before = rt.statistics().embeddings.batches
        results: list[Any] = []

        async def one(i: int) -> None:
            results.append(
                await client.embeddings.create(model=MODEL, input=f"text {i}", encoding_format="float")
            )

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        batches = rt.statistics().embeddings.batches - before
    assert len(results) == 8 and batches < 8


@BOTH
async def test_langchain_ollama_embeddings(kind: str) -> None:
    require_modules("langchain_ollama")
    module = await anyio.to_thread.run_sync(importlib.import_module, "langchain_ollama")  # 0.5 s
    async with served(kind, slots=2) as (rt, url):
        embedder = await anyio.to_thread.run_sync(lambda: module.OllamaEmbeddings(model=MODEL, base_url=url))
        docs = await embedder.aembed_documents(TEXTS)
        query = await embedder.aembed_query(TEXTS[0])
        want = await rt.embed(TEXTS)
        await embedder._async_client._client.aclose()  # it has no close of its own
    assert len(docs) == 3 and all(close(d, w) for d, w in zip(docs, want.vectors, strict=True))
    assert close(query, want.vectors[0])
