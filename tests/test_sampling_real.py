"""The sampler chain on llama.cpp (the default path: temperature 0.8), not only greedy argmax."""

from __future__ import annotations

from typing import Any

from runtime import GenerateRequest
from tests.helpers import PROMPTS, complete_all, open_runtime

PROMPT = "Once upon a time, in a small village by the sea,"


def sampled(seed: int, **fields: Any) -> GenerateRequest:
    return GenerateRequest(**{"prompt": PROMPT, "max_tokens": 24, "temperature": 0.8, "seed": seed, **fields})


async def test_a_seed_gives_the_same_text_alone_and_in_a_batch_and_seeds_differ() -> None:
    async with open_runtime("llama_cpp", slots=4, prefix_cache=False) as rt:
        alone = await rt.complete(sampled(7))
        again = await rt.complete(sampled(7))
        others = [
            GenerateRequest(prompt=p, max_tokens=24, temperature=0.8, seed=i)
            for i, p in enumerate(PROMPTS[:3])
        ]
        batch = await complete_all(rt, [sampled(7), *others])
        seeds = [await rt.complete(sampled(seed)) for seed in (1, 2, 3)]
    assert alone.token_ids == again.token_ids
    assert batch[0].token_ids == alone.token_ids  # beside three other sampled sequences
    assert len({alone.token_ids, *(s.token_ids for s in seeds)}) >= 3  # different seeds, different texts


async def test_top_k_one_is_greedy_and_a_repeat_penalty_changes_the_text() -> None:
    async with open_runtime("llama_cpp", slots=2, prefix_cache=False) as rt:
        greedy = await rt.complete(GenerateRequest(prompt=PROMPT, max_tokens=32, temperature=0))
        top1 = await rt.complete(sampled(99, top_k=1, max_tokens=32))
        penalised = await rt.complete(
            GenerateRequest(prompt=PROMPT, max_tokens=32, temperature=0, repeat_penalty=1.8, repeat_last_n=64)
        )
    assert top1.token_ids == greedy.token_ids
    assert penalised.token_ids != greedy.token_ids
    assert len(set(penalised.token_ids)) >= len(set(greedy.token_ids))  # fewer repeats, more distinct tokens
