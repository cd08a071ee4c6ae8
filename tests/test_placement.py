"""Which idle slot takes a request (actors.placement), alone and in the runtime on the fake."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.placement import choose_slot, common_prefix
from runtime import ChatMessage, ChatRequest
from tests.helpers import greedy, open_runtime

tokens = st.lists(st.integers(0, 3), max_size=12)


@given(prompt=tokens, cached=st.lists(tokens, min_size=1, max_size=5), share=st.floats(0, 1.5))
def test_the_choice_is_the_longest_prefix_above_the_share_else_the_least_recently_used(
    prompt: list[int], cached: list[list[int]], share: float
) -> None:
    i = choose_slot(prompt, cached, share)
    shared = [common_prefix(c, prompt) for c in cached]
    best = max(shared)
    if prompt and best > 0 and best >= share * len(prompt):
        assert shared[i] == best and i == shared.index(best)  # the first of the longest
    else:
        assert i == 0


def test_no_idle_slot_is_an_error() -> None:
    with pytest.raises(ValueError, match="no idle slot"):
        choose_slot([1], [], 0.1)


async def test_a_request_goes_to_the_slot_that_holds_its_prefix() -> None:
    """Four slots, four different prompts served; each prompt again, one at a time, goes back to
    the slot that served it (LRU order would send each to another), with its prompt cached."""
    prompts = [f"{i} is the number of this prompt: " + "x" * 40 for i in range(4)]  # nothing shared
    async with open_runtime("fake", slots=4) as rt:
        async with anyio.create_task_group() as tg:  # all four at once: each slot takes one
            first: dict[int, int] = {}

            async def one(i: int) -> None:
                done = await rt.complete(greedy(prompts[i], max_tokens=4))
                first[i] = done.stats.slot

            for i in range(4):
                tg.start_soon(one, i)
        for i in (3, 1, 0, 2):
            again = await rt.complete(greedy(prompts[i], max_tokens=4))
            assert again.stats.slot == first[i]
            assert again.stats.prompt_tokens_cached == again.stats.prompt_tokens - 1
        placement = rt.statistics().supervisor.placement
    assert placement.by_prefix == 4 and placement.least_recently_used == 4


async def test_a_chat_turn_reuses_the_whole_last_turn_and_answers_as_without_cache() -> None:
    """Turn 2 resends turn 1 and its answer: every token of them comes from the cache (the
    answer's cells were kept), and the answers equal those of a runtime without the cache."""
    answers: dict[bool, list[str]] = {}
    cached: list[int] = []
    for cache in (False, True):
        async with open_runtime("fake", slots=2, prefix_cache=cache) as rt:
            history = [ChatMessage(role="user", content="hello there")]
            answers[cache] = []
            for turn in range(3):
                done = await rt.complete_chat(
                    ChatRequest(messages=tuple(history), max_tokens=8, temperature=0)
                )
                answers[cache].append(done.text)
                if cache:
                    cached.append(done.stats.prompt_tokens_cached)
                history += [
                    ChatMessage(role="assistant", content=done.text),
                    ChatMessage(role="user", content=f"and turn {turn + 2}?"),
                ]
    assert answers[True] == answers[False]
    # The fake's tokens are bytes; turn 1's prompt and its answer's 8 tokens but the last (not
    # fed back: it ended the answer) are the cells turn 2 finds.
    assert cached[:2] == [0, len("<user>hello there\n<assistant>") + 7]
    assert cached[2] > cached[1]


async def test_without_a_prefix_to_choose_by_the_least_recently_used_slot_serves_as_with_the_door() -> None:
    """One request at a time goes to the least recently used slot, with the door (prompts that
    share nothing) and without it (the prefix cache off: every idle slot waits on the mailbox);
    a burst of as many requests as slots gives each slot one."""
    for cache in (True, False):
        async with open_runtime("fake", slots=3, prefix_cache=cache) as rt:
            order = [(await rt.complete(greedy(f"{i} alone", max_tokens=2))).stats.slot for i in range(6)]
            assert sorted(order[:3]) == [0, 1, 2] and order[3:] == order[:3]
            burst: list[int] = []

            async def one(i: int, burst: list[int] = burst) -> None:
                burst.append((await rt.complete(greedy(f"{i} at once", max_tokens=2))).stats.slot)

            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(one, i)
            assert sorted(burst) == [0, 1, 2]
            placement = rt.statistics().supervisor.placement
            assert (placement.by_prefix, placement.least_recently_used, placement.idle) == (0, 9, 3)


@given(
    a=st.lists(st.integers(0, 2), max_size=200),
    b=st.lists(st.integers(0, 2), max_size=200),
    shared=st.lists(st.integers(0, 2), max_size=150),
    as_tuple=st.booleans(),
)
def test_the_common_prefix_is_the_length_where_they_first_differ(
    a: list[int], b: list[int], shared: list[int], as_tuple: bool
) -> None:
    """Past the comparison's chunks (long shared prefixes), and for a tuple against a list."""
    a, b = shared + a, shared + b
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    assert common_prefix(tuple(a) if as_tuple else a, b) == n
    assert choose_slot(b, [[9], tuple(a) if as_tuple else a], 0.0) == (1 if n else 0)
