"""Presence and frequency penalties (OpenAI's, and Ollama's options) through llama.cpp's
penalties sampler, on the fake backend and on the embedded model."""

from __future__ import annotations

from typing import Any

import pytest

from runtime import GenerateRequest, InvalidRequestError, decode_request
from tests.helpers import PROMPTS, greedy, open_runtime

pytestmark = pytest.mark.parametrize("kind", ["fake", "llama_cpp", "ctransformers"])


def repeats(tokens: tuple[int, ...]) -> int:
    """Tokens that occurred before in the same answer."""
    return len(tokens) - len(set(tokens))


async def test_penalties_change_the_answer_against_none_at_the_same_seed(kind: str) -> None:
    """At temperature 0 and at 0.7 with one seed: a presence or a frequency penalty of 2 gives
    another answer than none, with fewer repeated tokens; the same request twice gives the same answer (the penalties are deterministic)."""
    prompt = PROMPTS[2]
    async with open_runtime(kind, slots=2, prefix_cache=False) as rt:
        for temperature in (0.0, 0.7):
            same: dict[str, Any] = {"prompt": prompt, "max_tokens": 80, "temperature": temperature, "seed": 5}
            plain = await rt.complete(GenerateRequest(**same))
            present = await rt.complete(GenerateRequest(**same, presence_penalty=2.0))
            again = await rt.complete(GenerateRequest(**same, presence_penalty=2.0))
            frequent = await rt.complete(GenerateRequest(**same, frequency_penalty=2.0))
            assert present.token_ids != plain.token_ids
            assert frequent.token_ids != plain.token_ids
            assert again.token_ids == present.token_ids
            assert repeats(present.token_ids) < repeats(plain.token_ids)
            assert repeats(frequent.token_ids) < repeats(plain.token_ids)


async def test_a_negative_presence_penalty_repeats_more(kind: str) -> None:
    async with open_runtime(kind, slots=1, prefix_cache=False) as rt:
        plain = await rt.complete(greedy(PROMPTS[6], max_tokens=40))
        eager = await rt.complete(greedy(PROMPTS[6], max_tokens=40, presence_penalty=-2.0))
    if kind == "fake":  # the fake only steers away from repeats
        assert eager.token_ids != plain.token_ids
    else:
        assert repeats(eager.token_ids) > repeats(plain.token_ids)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.01, -3, float("inf")])
def test_penalties_outside_minus_2_to_2_are_refused(kind: str, field: str, value: float) -> None:
    with pytest.raises(InvalidRequestError, match=f"{field} is .*; it must be -2 to 2"):
        decode_request({"prompt": "x", field: value}, GenerateRequest)
