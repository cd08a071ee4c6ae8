"""A request's n choices (OpenAI's ``n``) through the runtime, on the fake backend and on the
embedded model: one prompt evaluation for all, identical choices at temperature 0, their own
samples otherwise, and the limits."""

from __future__ import annotations

import pytest

from runtime import GenerateRequest, InvalidRequestError, QueueFullError
from tests.helpers import PROMPTS, chat, greedy, open_runtime

pytestmark = pytest.mark.parametrize("kind", ["fake", "llama_cpp"])


async def test_two_choices_at_temperature_0_are_one_prefill_and_the_same_answer(kind: str) -> None:
    """n = 2, greedy: both choices equal the single answer, and the steps decoded the prompt once
    (prompt + (max_tokens - 1) per choice tokens in all; two prefills would add the prompt again)."""
    max_tokens = 12
    async with open_runtime(kind, slots=2, prefix_cache=False, fake={"step_delay_s": 0.001}) as rt:
        alone = await rt.complete(greedy(PROMPTS[2], max_tokens=max_tokens))
        before = rt.statistics().model.tokens_decoded
        choices = await rt.generate_choices(greedy(PROMPTS[2], max_tokens=max_tokens), 2).collect()
        decoded = rt.statistics().model.tokens_decoded - before
        n_prompt = alone.stats.prompt_tokens
    assert [c.token_ids for c in choices] == [alone.token_ids] * 2
    assert [c.text for c in choices] == [alone.text] * 2
    assert all(c.done_reason == "length" and c.stats.completion_tokens == max_tokens for c in choices)
    assert decoded == n_prompt + 2 * (max_tokens - 1)


async def test_sampled_choices_differ_and_a_chat_shares_too(kind: str) -> None:
    """n = 3 at temperature 1 with a seed: three different answers (seeds seed, seed + 1,
    seed + 2), the same three again for the same seed; a chat request with n = 3 shares too."""
    request = GenerateRequest(
        prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_k=0, top_p=1, min_p=0, seed=3
    )
    async with open_runtime(kind, slots=3, prefix_cache=False) as rt:
        first = await rt.generate_choices(request, 3).collect()
        again = await rt.generate_choices(request, 3).collect()
        before = rt.statistics().model.tokens_decoded
        talk = await rt.generate_choices(chat("Hi!", max_tokens=5), 3).collect()
        decoded = rt.statistics().model.tokens_decoded - before
    assert len({c.token_ids for c in first}) == 3
    assert [c.token_ids for c in again] == [c.token_ids for c in first]
    assert len({c.text for c in talk}) == 1
    assert decoded == talk[0].stats.prompt_tokens + 3 * 4


async def test_choices_stream_with_their_index_and_logprobs(kind: str) -> None:
    request = greedy(PROMPTS[1], max_tokens=6, logprobs=True, top_logprobs=2)
    async with open_runtime(kind, slots=2) as rt, rt.generate_choices(request, 2) as stream:
        chunks = [c async for c in stream]
    assert {c.index for c in chunks} == {0, 1}
    assert [c.done for c in chunks].count(True) == 2
    for i in (0, 1):
        mine = [c for c in chunks if c.index == i]
        assert mine[-1].done
        assert len([lp for c in mine for lp in c.logprobs]) >= 5


async def test_n_beyond_the_slots_or_the_queue_is_refused_and_the_runtime_goes_on(kind: str) -> None:
    async with open_runtime(kind, slots=2, max_queue=1) as rt:
        with pytest.raises(InvalidRequestError, match="n is 3; it must be 1 to 2: each choice takes a slot"):
            rt.generate_choices(greedy("x"), 3)
        with pytest.raises(InvalidRequestError, match="n is 0"):
            rt.generate_choices(greedy("x"), 0)
        busy = [rt.generate(greedy(PROMPTS[i], max_tokens=30)) for i in range(2)]
        for stream in busy:
            await stream.__anext__()  # both slots busy; one place in the queue
        with pytest.raises(QueueFullError):
            rt.generate_choices(greedy("x"), 2)
        for stream in busy:
            await stream.collect()
        done = await rt.generate_choices(greedy(PROMPTS[0], max_tokens=4), 2).collect()
        status = rt.status()
    assert [c.done_reason for c in done] == ["length", "length"]
    assert status.requests_in_flight == 0
