"""The HTTP server driven by the frameworks apps are built on, on the fake backend and the embedded
model: LangChain's ChatOllama (validate_model_on_init), OllamaLLM and ChatOpenAI, and litellm's
ollama/, ollama_chat/ and openai/ routes. Each answer equals the runtime's (or the server's own)
for the same greedy request; litellm's usage counts are the runtime's; a context overflow on
litellm's openai/ route is its ContextWindowExceededError. Nothing reaches past loopback (litellm
reads its model cost map from its package: LITELLM_LOCAL_MODEL_COST_MAP)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import ollama
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime import ChatMessage, ChatRequest, Runtime
from runtime.server import create_app, serving
from tests.helpers import PROMPTS, open_runtime, require_modules
from tests.test_server_clients import http_client, user
from tests.test_server_compat import primary

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported

pytestmark = pytest.mark.parametrize("kind", ["fake", "llama_cpp"])

T = TypeVar("T")
N_PREDICT = 8
SYSTEM = "Answer briefly."
QUESTION = "Name a fruit."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


def chat_request(max_tokens: int = N_PREDICT) -> ChatRequest:
    """The runtime's request for MESSAGES, greedy."""
    messages = (ChatMessage(role="system", content=SYSTEM), *user(QUESTION))
    return ChatRequest(messages=messages, temperature=0.0, max_tokens=max_tokens)


class Recorder:
    """ASGI middleware that keeps each request's path and JSON body (to replay what a library sent)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body:
            self.requests.append((scope["path"], json.loads(body)))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@asynccontextmanager
async def served(kind: str, **config: Any) -> AsyncIterator[tuple[Runtime, str, Recorder]]:
    """A ready runtime on ``kind``, the base URL of a server for it and the server's request log."""
    config.setdefault("threads", 1)
    async with open_runtime(kind, **config) as rt:
        recorder = Recorder(create_app(rt))
        async with serving(recorder) as url:
            yield rt, url, recorder


async def off_loop(call: Callable[[], T]) -> T:
    """``call`` in a worker thread: the libraries' sync calls block, and building their HTTP
    clients reads the CA certificates (too long for the event loop the server runs on)."""
    return await anyio.to_thread.run_sync(call)


async def imported(name: str) -> Any:
    """Module ``name``, imported in a worker thread (LangChain's take 0.3 to 0.5 s, litellm's 4 s)."""
    require_modules(name)
    return await anyio.to_thread.run_sync(importlib.import_module, name)


def close_ollama_clients(model: Any) -> None:
    """Close the httpx clients of a LangChain Ollama model (it has no close of its own)."""
    model._client._client.close()


def refuse_unknown(url: str, lc: Any) -> None:
    """LangChain's check of validate_model_on_init for a model not served, on a client closed after."""
    with ollama.Client(host=url) as client:
        importlib.import_module("langchain_ollama._utils").validate_model(client, "llama3.2")


def close_litellm_clients(litellm: Any) -> None:
    """Close the sync HTTP clients litellm caches (per provider and base URL) and forget them all
    (the async ones it caches beside them never connected: the tests call litellm.completion)."""
    cache = litellm.in_memory_llm_clients_cache
    for client in list(cache.cache_dict.values()):
        close = getattr(client, "close", None)
        if callable(close) and not inspect.iscoroutinefunction(close):
            close()
    cache.flush_cache()


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Name lookups of any host but loopback fail and are recorded (the test asserts there are none)."""
    looked_up: list[str] = []
    resolve = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "localhost", "::1", None):
            looked_up.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, "tests reach loopback only")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


async def test_langchain_chat_ollama_and_ollama_llm_answer_as_the_runtime(
    kind: str, loopback_only: list[str]
) -> None:
    """ChatOllama validates the served name and ``name:latest`` at init, invoke and stream give the
    runtime's text; OllamaLLM (templated /api/generate) likewise for a prompt."""
    lc = await imported("langchain_ollama")

    async with served(kind, slots=2, prefix_cache=False) as (rt, url, _):
        name = primary(rt)
        texts: dict[str, tuple[str, str]] = {}
        for model in (name, f"{name}:latest"):
            chat = await off_loop(lambda m=model: lc.ChatOllama(  # type: ignore[misc]
                model=m, base_url=url, validate_model_on_init=True, temperature=0, num_predict=N_PREDICT
            ))  # fmt: skip
            whole = await off_loop(lambda c=chat: c.invoke(MESSAGES))  # type: ignore[misc]
            parts = await off_loop(lambda c=chat: [str(p.content) for p in c.stream(MESSAGES)])  # type: ignore[misc]
            texts[model] = (str(whole.content), "".join(parts))
            await off_loop(lambda c=chat: close_ollama_clients(c))  # type: ignore[misc]
        with pytest.raises(ValueError, match=r"`llama3\.2` not found"):  # what validate_model_on_init runs
            await off_loop(lambda: refuse_unknown(url, lc))
        llm = await off_loop(lambda: lc.OllamaLLM(
            model=name, base_url=url, validate_model_on_init=True, temperature=0, num_predict=N_PREDICT
        ))  # fmt: skip
        completion = await off_loop(lambda: llm.invoke(PROMPTS[0]))
        completion_parts = await off_loop(lambda: list(llm.stream(PROMPTS[0])))
        await off_loop(lambda: close_ollama_clients(llm))
        want_chat = await rt.complete(chat_request())
        want_text = await rt.complete(
            ChatRequest(messages=user(PROMPTS[0]), temperature=0.0, max_tokens=N_PREDICT)
        )
    assert want_chat.text
    assert texts == {name: (want_chat.text,) * 2, f"{name}:latest": (want_chat.text,) * 2}
    assert completion == "".join(completion_parts) == want_text.text
    assert loopback_only == []


async def test_langchain_chat_openai_answers_as_the_runtime(kind: str, loopback_only: list[str]) -> None:
    """ChatOpenAI against /v1: invoke and stream (with usage) give the runtime's text and counts."""
    lc = await imported("langchain_openai")

    async with served(kind, slots=2, prefix_cache=False) as (rt, url, _):
        chat = await off_loop(lambda: lc.ChatOpenAI(
            model="slotserve", base_url=f"{url}/v1", api_key="unused",
            temperature=0, max_tokens=N_PREDICT, max_retries=0, stream_usage=True,
        ))  # fmt: skip
        whole = await off_loop(lambda: chat.invoke(MESSAGES))
        parts = await off_loop(lambda: list(chat.stream(MESSAGES)))
        await off_loop(chat.root_client.close)
        want = await rt.complete(chat_request())
    assert whole.content == want.text
    assert whole.response_metadata["finish_reason"] == want.done_reason
    counts = (want.stats.prompt_tokens, want.stats.completion_tokens)
    assert whole.usage_metadata is not None
    assert (whole.usage_metadata["input_tokens"], whole.usage_metadata["output_tokens"]) == counts
    assert "".join(str(p.content) for p in parts) == want.text
    total = sum(parts[1:], parts[0])
    assert total.usage_metadata is not None
    assert (total.usage_metadata["input_tokens"], total.usage_metadata["output_tokens"]) == counts
    assert loopback_only == []


async def test_litellm_routes_answer_as_the_runtime_with_its_counts(
    kind: str, loopback_only: list[str]
) -> None:
    """ollama_chat/ and openai/ give the runtime's text and usage for the same chat; ollama/ (whose
    prompt litellm builds itself) gives what the server answers to the request litellm sent."""
    litellm = await imported("litellm")

    async with served(kind, slots=2, prefix_cache=False) as (rt, url, recorder):
        name = primary(rt)
        common: dict[str, Any] = {
            "messages": MESSAGES,
            "temperature": 0,
            "max_tokens": N_PREDICT,
            "num_retries": 0,
        }
        chat = await off_loop(lambda: litellm.completion(model=f"ollama_chat/{name}", api_base=url, **common))
        via_openai = await off_loop(lambda: litellm.completion(
            model=f"openai/{name}", api_base=f"{url}/v1", api_key="unused", **common
        ))  # fmt: skip
        streamed = await off_loop(lambda: [
            c.choices[0].delta.content or "" for c in litellm.completion(
                model=f"openai/{name}", api_base=f"{url}/v1", api_key="unused", stream=True, **common
            )
        ])  # fmt: skip
        recorder.requests.clear()
        generated = await off_loop(lambda: litellm.completion(model=f"ollama/{name}", api_base=url, **common))
        (sent,) = [body for path, body in recorder.requests if path == "/api/generate"]
        async with await http_client(url) as client:
            own = (await client.post("/api/generate", json=sent | {"stream": False})).json()
        want = await rt.complete(chat_request())
        await off_loop(lambda: close_litellm_clients(litellm))
    counts = (want.stats.prompt_tokens, want.stats.completion_tokens)
    for answer in (chat, via_openai):
        assert answer.choices[0].message.content == want.text
        assert answer.choices[0].finish_reason == want.done_reason
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == counts
        assert answer.usage.total_tokens == sum(counts)
    assert "".join(streamed) == want.text
    assert sent["options"]["num_predict"] == N_PREDICT
    assert generated.choices[0].message.content == own["response"]
    assert (generated.usage.prompt_tokens, generated.usage.completion_tokens) == (
        own["prompt_eval_count"], own["eval_count"],
    )  # fmt: skip
    assert own["eval_count"] == N_PREDICT or own["done_reason"] == "stop"
    assert loopback_only == []


async def test_litellm_sees_a_context_overflow_on_the_openai_route(
    kind: str, loopback_only: list[str]
) -> None:
    """max_tokens past a 64-token slot on openai/: the server's context_length_exceeded is litellm's
    ContextWindowExceededError, and a request that fits still answers as the runtime."""
    litellm = await imported("litellm")

    async with served(kind, slots=1, n_ctx_per_slot=64) as (rt, url, _):
        route: dict[str, Any] = {"model": "openai/slotserve", "api_base": f"{url}/v1", "api_key": "unused"}
        try:
            with pytest.raises(litellm.ContextWindowExceededError) as refused:
                await off_loop(
                    lambda: litellm.completion(messages=MESSAGES, max_tokens=4096, num_retries=0, **route)
                )
            fits = await off_loop(lambda: litellm.completion(
                messages=MESSAGES, max_tokens=4, temperature=0, num_retries=0, **route
            ))  # fmt: skip
        finally:
            await off_loop(lambda: close_litellm_clients(litellm))
        want = await rt.complete(chat_request(max_tokens=4))
    assert refused.value.status_code == 400
    assert "slot context is 64 tokens" in str(refused.value)
    assert fits.choices[0].message.content == want.text
    assert loopback_only == []
