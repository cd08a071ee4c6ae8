"""logprobs / top_logprobs and the penalties over HTTP, driven by the official ``openai`` and
``ollama`` clients, on the fake backend and on the embedded model: the values equal the embedded
API's, streamed and not; bad values get a typed 400 in each API's shape and the server goes on."""

from __future__ import annotations

import math
from typing import Any

import ollama
import openai
import pytest

from runtime import ChatRequest, GenerateRequest
from tests.helpers import PROMPTS
from tests.test_server_clients import MODEL, http_client, ollama_client, openai_client, served, user

pytestmark = pytest.mark.parametrize("kind", ["fake", "llama_cpp"])


async def test_openai_chat_logprobs_equal_the_embedded_api(kind: str) -> None:
    """chat.completions with logprobs and top_logprobs 3, whole and streamed: one record per
    token with token, logprob, bytes and 3 top entries, equal to rt.complete's; top-1 is the
    greedy token."""
    messages: list[Any] = [{"role": "user", "content": "Name a colour."}]
    async with served(kind, slots=2, prefix_cache=False) as (rt, url), await openai_client(url) as client:
        whole = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
            stream=True,
        )  # fmt: skip
        chunks = [c async for c in stream]
        plain = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=8
        )
        want = await rt.complete(
            ChatRequest(
                messages=user("Name a colour."), temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
            )
        )
        pieces = rt.backend.pieces
    assert plain.choices[0].logprobs is None
    content = whole.choices[0].logprobs.content if whole.choices[0].logprobs else None
    assert content is not None and len(content) == len(want.logprobs) > 0
    for got, lp in zip(content, want.logprobs, strict=True):
        assert got.bytes == list(pieces[lp.token_id])
        assert got.token == pieces[lp.token_id].decode(errors="replace")
        assert math.isclose(got.logprob, lp.logprob, abs_tol=1e-5)
        assert got.logprob <= 0
        assert got.top_logprobs[0].token == got.token
        assert [t.bytes for t in got.top_logprobs] == [list(pieces[t.token_id]) for t in lp.top]
        assert len(got.top_logprobs) == 3
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


async def test_openai_completions_logprobs_have_the_four_lists(kind: str) -> None:
    """completions with logprobs 2: tokens, token_logprobs, top_logprobs (2 entries each, the
    top one the token itself) and text_offset (characters into the answer), streamed the same."""
    async with served(kind, slots=1) as (rt, url), await openai_client(url) as client:
        whole = await client.completions.create(
            model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=8, logprobs=2
        )
        parts = [c async for c in await client.completions.create(
            model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=8, logprobs=2, stream=True
        )]  # fmt: skip
        want = await rt.complete(
            GenerateRequest(prompt=PROMPTS[0], temperature=0, max_tokens=8, logprobs=True)
        )
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.token_logprobs == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)  # two tokens may spell the same text
    for token, top, value in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs, strict=True):
        assert max(top.values()) == pytest.approx(value, abs=1e-5)
        assert token in top
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    offsets = [o for c in parts if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset or []]
    assert offsets == lp.text_offset


async def test_ollama_logprobs_on_generate_and_chat(kind: str) -> None:
    """generate and chat with logprobs and top_logprobs 2, whole and streamed: Ollama's records
    (token, logprob, top_logprobs) whose tokens spell the answer, the top one the token's own."""
    opts = {"temperature": 0, "num_predict": 8}
    async with served(kind, slots=1) as (_rt, url), await ollama_client(url) as client:
        whole = await client.generate(
            model=MODEL, prompt=PROMPTS[1], options=opts, logprobs=True, top_logprobs=2
        )
        parts = [p async for p in await client.generate(
            model=MODEL, prompt=PROMPTS[1], options=opts, logprobs=True, top_logprobs=2, stream=True
        )]  # fmt: skip
        talk = await client.chat(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], options=opts, logprobs=True
        )
        plain = await client.generate(model=MODEL, prompt=PROMPTS[1], options=opts)
    assert whole.logprobs and plain.logprobs is None
    assert "".join(lp.token for lp in whole.logprobs) == whole.response
    for lp in whole.logprobs:
        assert lp.logprob <= 0
        assert lp.top_logprobs is not None and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token == lp.token
    streamed = [lp for p in parts for lp in p.logprobs or []]
    assert [(lp.token, lp.logprob) for lp in streamed] == [(lp.token, lp.logprob) for lp in whole.logprobs]
    assert talk.logprobs and "".join(lp.token for lp in talk.logprobs) == talk.message.content
    assert all(lp.top_logprobs == [] for lp in talk.logprobs)


async def test_penalties_over_both_apis_change_the_answer(kind: str) -> None:
    """presence_penalty and frequency_penalty (OpenAI's fields, Ollama's options) give the
    embedded API's penalised answer, which differs from the plain one."""
    same: dict[str, Any] = {"temperature": 0, "max_tokens": 60}
    async with served(kind, slots=1, prefix_cache=False) as (rt, url):
        async with await openai_client(url) as client:
            got = await client.completions.create(
                model=MODEL, prompt=PROMPTS[2], presence_penalty=1.5, frequency_penalty=0.5, temperature=0,
                max_tokens=60,
            )  # fmt: skip
        async with await ollama_client(url) as oclient:
            options = {"temperature": 0, "num_predict": 60, "presence_penalty": 1.5, "frequency_penalty": 0.5}
            got_ollama = await oclient.generate(model=MODEL, prompt=PROMPTS[2], raw=True, options=options)
        want = await rt.complete(
            GenerateRequest(prompt=PROMPTS[2], presence_penalty=1.5, frequency_penalty=0.5, **same)
        )
        plain = await rt.complete(GenerateRequest(prompt=PROMPTS[2], **same))
    assert got.choices[0].text == want.text == got_ollama.response
    assert want.text != plain.text


async def test_bad_values_get_a_typed_400_and_the_server_goes_on(kind: str) -> None:
    """top_logprobs 21, logprobs 30 (completions), a penalty of 2.5: OpenAI's error object with
    code invalid_request, Ollama's {"error"}; then a good request is answered."""
    chat: list[Any] = [{"role": "user", "content": "hi"}]
    async with served(kind, slots=1) as (_rt, url):
        async with await openai_client(url) as client:
            with pytest.raises(openai.BadRequestError) as top:
                await client.chat.completions.create(
                    model=MODEL, messages=chat, logprobs=True, top_logprobs=21
                )
            with pytest.raises(openai.BadRequestError) as old:
                await client.completions.create(model=MODEL, prompt="hi", logprobs=30)
            with pytest.raises(openai.BadRequestError) as penalty:
                await client.chat.completions.create(model=MODEL, messages=chat, presence_penalty=2.5)
            fine = await client.chat.completions.create(
                model=MODEL, messages=chat, max_tokens=3, logprobs=True
            )
        async with await ollama_client(url) as oclient:
            with pytest.raises(ollama.ResponseError) as otop:
                await oclient.generate(model=MODEL, prompt="hi", logprobs=True, top_logprobs=21)
            with pytest.raises(ollama.ResponseError) as openalty:
                await oclient.generate(model=MODEL, prompt="hi", options={"frequency_penalty": -2.5})
            ofine = await oclient.generate(model=MODEL, prompt="hi", options={"num_predict": 3})
        async with await http_client(url) as http:
            raw = await http.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": chat, "top_logprobs": 2}
            )
    for exc, says in [(top, "top_logprobs is 21; it must be 0 to 20"), (old, "logprobs is 30; it must be 0 to 20"),
                      (penalty, "presence_penalty is 2.5; it must be -2 to 2")]:  # fmt: skip
        assert exc.value.status_code == 400
        assert exc.value.code == "invalid_request"
        assert says in exc.value.message
    assert otop.value.status_code == 400 and "top_logprobs is 21" in otop.value.error
    assert openalty.value.status_code == 400 and "frequency_penalty is -2.5" in openalty.value.error
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"
    assert "needs logprobs true" in raw.json()["error"]["message"]
    assert fine.choices[0].logprobs is not None and fine.choices[0].logprobs.content
    assert ofine.done


async def test_openai_client_n_2_gives_two_indexed_choices_from_one_prefill(kind: str) -> None:
    """n = 2 at temperature 0 (chat and completions, whole and streamed, with logprobs): two
    identical choices indexed 0 and 1, equal to the single answer; usage counts the prompt once
    and both completions; the prompt was decoded once for each request."""
    messages: list[Any] = [{"role": "user", "content": "Name a fruit."}]
    async with served(kind, slots=2, prefix_cache=False) as (rt, url), await openai_client(url) as client:
        one = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=8
        )
        before = rt.statistics().model.tokens_decoded
        two = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=8, n=2, logprobs=True
        )
        decoded = rt.statistics().model.tokens_decoded - before
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=8, n=2, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        text = await client.completions.create(
            model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=6, n=2
        )
        parts = [c async for c in await client.completions.create(
            model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=6, n=2, stream=True
        )]  # fmt: skip
    assert one.usage is not None and two.usage is not None
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [one.choices[0].message.content] * 2
    assert [c.finish_reason for c in two.choices] == [one.choices[0].finish_reason] * 2
    assert two.choices[0].logprobs is not None and two.choices[1].logprobs is not None
    assert two.choices[0].logprobs.content == two.choices[1].logprobs.content
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    assert decoded == one.usage.prompt_tokens + 2 * (one.usage.completion_tokens - 1)
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == one.choices[0].message.content
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine][-1] == one.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == two.usage.completion_tokens
    assert [c.index for c in text.choices] == [0, 1] and text.choices[0].text == text.choices[1].text
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in parts if c.choices[0].index == i) == text.choices[0].text


async def test_n_beyond_the_slots_is_a_typed_400_and_the_server_goes_on(kind: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    async with served(kind, slots=2) as (_rt, url), await openai_client(url) as client:
        with pytest.raises(openai.BadRequestError) as many:
            await client.chat.completions.create(model=MODEL, messages=messages, n=3)
        with pytest.raises(openai.BadRequestError) as none:
            await client.completions.create(model=MODEL, prompt="hi", n=0)
        fine = await client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=3)
    assert many.value.status_code == 400 and many.value.code == "invalid_request"
    assert "n is 3; it must be 1 to 2: each choice takes a slot, and this runtime has 2" in many.value.message
    assert none.value.status_code == 400 and "n is 0; it must be 1 to 128" in none.value.message
    assert len(fine.choices) == 2
