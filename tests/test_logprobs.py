"""Log-probabilities and top_logprobs through the runtime, on the fake backend and on the
embedded model: the top-1 token is the greedy token, every value is <= 0, the top list is sorted
and has k entries, and requests that do not ask get none."""

from __future__ import annotations

import math

import pytest

from runtime import GenerateRequest, InvalidRequestError, decode_request
from tests.helpers import PROMPTS, complete_all, greedy, open_runtime

pytestmark = pytest.mark.parametrize("kind", ["fake", "llama_cpp"])


async def test_top_logprob_is_the_greedy_token_and_the_list_is_sorted(kind: str) -> None:
    """At temperature 0 each token is the argmax: its log-probability is the top one's; the top
    list has k entries, sorted, all <= 0, and the probabilities of the top k sum to at most 1."""
    k = 5
    async with open_runtime(kind, slots=2) as rt:
        plain = await rt.complete(greedy(PROMPTS[0], max_tokens=12))
        asked = await rt.complete(greedy(PROMPTS[0], max_tokens=12, logprobs=True, top_logprobs=k))
    assert asked.token_ids == plain.token_ids  # asking changes nothing of the answer
    assert plain.logprobs == ()
    generated = [t for t in asked.token_ids if t not in rt.backend.eog_tokens]
    assert [lp.token_id for lp in asked.logprobs] == generated
    for lp in asked.logprobs:
        assert lp.logprob <= 0
        assert len(lp.top) == k
        assert lp.top[0].token_id == lp.token_id
        assert math.isclose(lp.top[0].logprob, lp.logprob, abs_tol=1e-5)
        values = [t.logprob for t in lp.top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-4


async def test_logprobs_without_top_and_beside_requests_that_do_not_ask(kind: str) -> None:
    """4 requests batched together, two asking (one with top_logprobs 0, one with 3): only those
    two get records, each with as many top entries as it asked, and the answers stay the same."""
    requests = [
        greedy(PROMPTS[1], max_tokens=10, logprobs=True),
        greedy(PROMPTS[2], max_tokens=10),
        greedy(PROMPTS[3], max_tokens=10, logprobs=True, top_logprobs=3),
        greedy(PROMPTS[4], max_tokens=10),
    ]
    async with open_runtime(kind, slots=4, fake={"step_delay_s": 0.002}) as rt:
        together = await complete_all(rt, requests)
        alone = [await rt.complete(greedy(PROMPTS[i], max_tokens=10)) for i in (1, 2, 3, 4)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert together[0].logprobs and all(lp.top == () for lp in together[0].logprobs)
    assert together[2].logprobs and all(len(lp.top) == 3 for lp in together[2].logprobs)
    assert together[1].logprobs == () and together[3].logprobs == ()


async def test_sampled_tokens_get_their_own_logprob(kind: str) -> None:
    """At temperature 1.5 the sampled token need not be the top one; its log-probability is the
    one listed for it whenever it is among the top 20."""
    async with open_runtime(kind, slots=1) as rt:
        request = GenerateRequest(
            prompt=PROMPTS[5], max_tokens=16, temperature=1.5, top_k=0, top_p=1, min_p=0, seed=11,
            logprobs=True, top_logprobs=20,
        )  # fmt: skip
        done = await rt.complete(request)
    assert done.logprobs
    for lp in done.logprobs:
        listed = {t.token_id: t.logprob for t in lp.top}
        if lp.token_id in listed:
            assert math.isclose(listed[lp.token_id], lp.logprob, abs_tol=1e-5)
        else:
            assert lp.logprob <= lp.top[-1].logprob + 1e-6


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs is 21; it must be 0 to 20"),
        ({"top_logprobs": 2}, "top_logprobs is 2; it needs logprobs true"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs is -1"),
    ],
)
def test_bad_logprob_fields_are_refused(kind: str, fields: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        decode_request({"prompt": "x", **fields}, GenerateRequest)
