"""The HTTP server driven by the official ``ollama`` and ``openai`` clients, on the fake backend
and on the embedded model: answers equal the embedded API's, concurrency, the bounded queue."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import ollama
import openai
import pytest

from runtime import ChatMessage, ChatRequest, Completion, GenerateRequest, Runtime
from runtime.server import create_app, serving
from tests.helpers import PROMPTS, open_runtime

pytestmark = pytest.mark.parametrize("kind", ["fake", "llama_cpp"])
"""The HTTP layer does not depend on the backend; the runtime's own tests cover the others."""

MODEL = "slotserve"
"""An alias of the served model (any model name that is not one of its names gets 404)."""


@asynccontextmanager
async def served(kind: str, **config: Any) -> AsyncIterator[tuple[Runtime, str]]:
    """A ready runtime on ``kind`` and the base URL of a server for it on a free loopback port."""
    config.setdefault("threads", 1)  # on a shared, busy CPU one decode thread is the steadiest
    async with open_runtime(kind, **config) as rt, serving(create_app(rt)) as url:
        yield rt, url


async def ollama_client(url: str) -> ollama.AsyncClient:
    """An Ollama client for ``url``, built in a worker thread: building an HTTP client reads the
    CA certificates from disk (60 to 100 ms), which would hold the event loop the server runs on."""
    return await anyio.to_thread.run_sync(lambda: ollama.AsyncClient(host=url))


async def openai_client(url: str) -> openai.AsyncOpenAI:
    """An OpenAI client for ``url``/v1 without retries, built in a worker thread (see above),
    with the API resources it imports on first use already imported."""

    def build() -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        _ = (client.chat.completions, client.completions, client.models)
        return client

    return await anyio.to_thread.run_sync(build)


async def http_client(url: str) -> httpx.AsyncClient:
    """An httpx client for ``url``, built in a worker thread (see above)."""
    return await anyio.to_thread.run_sync(lambda: httpx.AsyncClient(base_url=url, timeout=120))


def user(text: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage(role="user", content=text),)


async def test_ollama_client_answers_equal_the_embedded_api(kind: str) -> None:
    """generate (templated and raw) and chat, streamed and not, with options, under greedy
    sampling: the same text, done_reason and counts as rt.complete for the same request."""
    opts = {"temperature": 0, "num_predict": 12, "top_k": 20, "seed": 3, "num_ctx": 256}
    same: dict[str, Any] = {"temperature": 0.0, "max_tokens": 12, "top_k": 20, "seed": 3}
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a fruit."},
    ]
    async with served(kind, slots=2, prefix_cache=False) as (rt, url):
        async with await ollama_client(url) as client:
            whole = await client.generate(model=MODEL, prompt=PROMPTS[0], options=opts)
            parts = [
                p
                async for p in await client.generate(
                    model=MODEL, prompt=PROMPTS[0], options=opts, stream=True
                )
            ]
            raw = await client.generate(model=MODEL, prompt=PROMPTS[3], raw=True, options=opts)
            talk = await client.chat(model=MODEL, messages=messages, options=opts)
            talk_parts = [
                p async for p in await client.chat(model=MODEL, messages=messages, options=opts, stream=True)
            ]
            stop = raw.response[4:7]
            cut = await client.generate(
                model=MODEL, prompt=PROMPTS[3], raw=True, options=opts | {"stop": [stop]}
            )
        want = await rt.complete(ChatRequest(messages=user(PROMPTS[0]), **same))
        want_raw = await rt.complete(GenerateRequest(prompt=PROMPTS[3], **same))
        chat_messages = (ChatMessage(role="system", content="Answer briefly."), *user("Name a fruit."))
        want_chat = await rt.complete(ChatRequest(messages=chat_messages, **same))
    assert whole.response == want.text
    assert (whole.done, whole.done_reason) == (True, want.done_reason)
    assert (whole.prompt_eval_count, whole.eval_count) == (
        want.stats.prompt_tokens,
        want.stats.completion_tokens,
    )
    assert whole.total_duration is not None
    assert whole.eval_duration is not None
    assert whole.total_duration >= whole.eval_duration > 0
    assert "".join(p.response or "" for p in parts) == want.text
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == want.stats.completion_tokens == 12
    assert raw.response == want_raw.text
    assert raw.prompt_eval_count == want_raw.stats.prompt_tokens
    assert talk.message.role == "assistant"
    assert talk.message.content == want_chat.text
    assert "".join(p.message.content or "" for p in talk_parts) == want_chat.text
    assert talk_parts[-1].done_reason == want_chat.done_reason
    assert stop
    assert cut.done_reason == "stop"
    assert cut.response == raw.response[: raw.response.index(stop)]


async def test_openai_client_answers_equal_the_embedded_api(kind: str) -> None:
    """chat.completions and completions, streamed (with usage) and not, under greedy sampling."""
    messages: list[Any] = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Hi!"},
    ]
    async with (
        served(kind, slots=2, prefix_cache=False) as (rt, url),
        await openai_client(url) as client,
    ):
        whole = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=10, seed=1
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=10, seed=1,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        text = await client.completions.create(model=MODEL, prompt=PROMPTS[1], temperature=0, max_tokens=9)
        text_chunks = [c async for c in await client.completions.create(
            model=MODEL, prompt=PROMPTS[1], temperature=0, max_tokens=9, stream=True
        )]  # fmt: skip
        default_length = await client.completions.create(model=MODEL, prompt=PROMPTS[1], temperature=0)
        chat_messages = (ChatMessage(role="system", content="Answer briefly."), *user("Hi!"))
        want_chat = await rt.complete(
            ChatRequest(messages=chat_messages, temperature=0, max_tokens=10, seed=1)
        )
        want_text = await rt.complete(GenerateRequest(prompt=PROMPTS[1], temperature=0, max_tokens=9))
    assert whole.choices[0].message.content == want_chat.text
    assert whole.choices[0].finish_reason == want_chat.done_reason
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        want_chat.stats.prompt_tokens, want_chat.stats.completion_tokens,
    )  # fmt: skip
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == want_chat.text
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (len(with_choices) - 1)
    assert with_choices[-1].choices[0].finish_reason == want_chat.done_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == want_chat.stats.completion_tokens
    assert chunks[-1].usage.total_tokens == want_chat.stats.prompt_tokens + want_chat.stats.completion_tokens
    assert text.choices[0].text == want_text.text
    assert text.usage is not None
    assert text.usage.completion_tokens == 9
    assert "".join(c.choices[0].text for c in text_chunks) == want_text.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert default_length.usage is not None
    assert default_length.usage.completion_tokens == 16


async def test_eight_clients_on_four_slots_each_get_their_own_answer(kind: str) -> None:
    """8 clients at once (4 through Ollama's API, 4 through OpenAI's) on 4 slots: every answer
    equals what its prompt gives alone, and the steps really carried 4 sequences."""
    lengths = [8 + 2 * i for i in range(8)]
    fake = {"step_delay_s": 0.005}  # steps that take time, as a model's: the clients overlap
    async with served(kind, slots=4, prefix_cache=False, fake=fake) as (rt, url):
        alone = [await rt.complete(GenerateRequest(prompt=p, temperature=0, max_tokens=n)) for p, n in
                 zip(PROMPTS, lengths, strict=True)]  # fmt: skip
        got: list[str | None] = [None] * 8

        async def ask(i: int) -> None:
            if i % 2 == 0:
                async with await ollama_client(url) as oc:
                    opts = {"temperature": 0, "num_predict": lengths[i]}
                    got[i] = (
                        await oc.generate(model=MODEL, prompt=PROMPTS[i], raw=True, options=opts)
                    ).response
            else:
                async with await openai_client(url) as ac:
                    r = await ac.completions.create(
                        model=MODEL, prompt=PROMPTS[i], temperature=0, max_tokens=lengths[i]
                    )
                    got[i] = r.choices[0].text

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(ask, i)
        steps = rt.statistics().model.steps_by_sequences
    assert got == [c.text for c in alone]
    assert max(steps) == 4


async def test_one_slot_and_max_queue_one_answers_two_of_six_and_refuses_four_at_once(kind: str) -> None:
    """6 simultaneous requests on 1 slot with max_queue 1: exactly 2 answers, and 4 immediate
    503s with Retry-After and OpenAI's error object."""
    fake = {"step_delay_s": 0.01}
    async with (
        served(kind, slots=1, max_queue=1, prefix_cache=False, fake=fake) as (rt, url),
        await openai_client(url) as client,
    ):
        want = (await rt.complete(GenerateRequest(prompt=PROMPTS[2], temperature=0, max_tokens=12))).text
        answers: list[tuple[float, str]] = []
        refusals: list[tuple[float, openai.APIStatusError]] = []

        async def ask() -> None:
            try:
                r = await client.completions.create(
                    model=MODEL, prompt=PROMPTS[2], temperature=0, max_tokens=12
                )
                answers.append((time.perf_counter(), r.choices[0].text))
            except openai.APIStatusError as exc:
                refusals.append((time.perf_counter(), exc))

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(ask)
        status = rt.status()
    assert (len(answers), len(refusals)) == (2, 4)
    assert [text for _, text in answers] == [want, want]
    first_answer = min(t for t, _ in answers)
    for t, exc in refusals:
        assert t < first_answer  # refused at once, not after waiting
        assert exc.status_code == 503
        assert exc.response.headers["retry-after"] == "1"
        body = exc.response.json()["error"]
        assert body["code"] == "queue_full"
        assert "max_queue=1" in body["message"]
    assert status.requests_rejected == 4


async def test_ollama_client_sees_503_and_404(kind: str) -> None:
    async with (
        served(kind, slots=1, max_queue=0, fake={"step_delay_s": 0.01}) as (rt, url),
        await ollama_client(url) as client,
    ):
        with pytest.raises(ollama.ResponseError) as missing:
            await client.generate(model="llama3.2", prompt="hi")
        busy = rt.generate(GenerateRequest(prompt=PROMPTS[0], temperature=0, max_tokens=30))
        await busy.__anext__()  # the one slot is busy and nothing may wait
        with pytest.raises(ollama.ResponseError) as full:
            await client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        rest: Completion = await busy.collect()
    assert missing.value.status_code == 404
    assert "'llama3.2' not found" in missing.value.error
    assert full.value.status_code == 503
    assert "mailbox is full" in full.value.error
    assert rest.done_reason == "length"
