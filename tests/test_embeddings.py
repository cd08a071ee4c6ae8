"""``rt.embed`` on the fake backend and the embedded model: a vector is the same alone and in a
batch, cosine similarity ranks a paraphrase above unrelated text, concurrent requests share
decodes, truncation and dimensions behave as Ollama's, bad input is refused and the runtime
keeps serving, and the embedding context never touches the generating one."""

from __future__ import annotations

import math
from typing import Any

import anyio
import numpy as np
import pytest

from runtime import (
    ContextOverflowError,
    Embeddings,
    EmbeddingsUnsupportedError,
    EmbedRequest,
    InvalidRequestError,
    Runtime,
)
from tests.helpers import greedy, open_runtime

BOTH = pytest.mark.parametrize("kind", ["fake", "llama_cpp"])
"""The backends that embed (ctransformers does not)."""

WIDTH = {"fake": 64, "llama_cpp": 576}
ANCHOR = "The cat sat on the mat."
PARAPHRASE = "A cat was sitting on the mat."
UNRELATED = [
    "Stock markets fell sharply on Tuesday.",
    "Quantum field theory is hard.",
    "def f(x): return x * 2",
]


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def concurrently(rt: Runtime, texts: list[str], **kw: Any) -> list[Embeddings]:
    """One rt.embed call per text, all at once."""
    out: list[Embeddings | None] = [None] * len(texts)

    async def one(i: int) -> None:
        out[i] = await rt.embed(texts[i], **kw)

    async with anyio.create_task_group() as tg:
        for i in range(len(texts)):
            tg.start_soon(one, i)
    return [r for r in out if r is not None]


@BOTH
async def test_the_same_text_alone_and_in_a_batch_of_8_gives_the_same_vector(kind: str) -> None:
    texts = [ANCHOR, PARAPHRASE, *UNRELATED, "hello", "a much longer sentence about the sea and ships", "x"]
    async with open_runtime(kind, slots=2, threads=2) as rt:
        alone = await rt.embed(ANCHOR)
        batch = await rt.embed(texts)
        stats = rt.statistics().embeddings
    assert len(batch.vectors) == 8 and stats.largest_batch == 8  # the 8 went into one decode
    assert len(alone.vectors[0]) == alone.dimensions == WIDTH[kind]
    assert math.isclose(float(np.linalg.norm(alone.vectors[0])), 1.0, abs_tol=1e-5)  # L2-normalised
    assert cosine(alone.vectors[0], batch.vectors[0]) > 0.9999
    assert batch.input_tokens[0] == alone.input_tokens[0] == alone.prompt_tokens > 0


@BOTH
async def test_cosine_ranks_a_paraphrase_above_unrelated_sentences(kind: str) -> None:
    async with open_runtime(kind, slots=1, threads=2) as rt:
        result = await rt.embed([ANCHOR, PARAPHRASE, *UNRELATED])
    anchor, paraphrase, *others = result.vectors
    near = cosine(anchor, paraphrase)
    assert all(near > cosine(anchor, other) for other in others), (near, [cosine(anchor, o) for o in others])


@BOTH
async def test_8_concurrent_requests_run_in_fewer_decodes_than_8(kind: str) -> None:
    texts = [f"sentence number {i} about {w}" for i, w in enumerate("abcdefgh")]
    async with open_runtime(kind, slots=2, threads=2) as rt:
        before = rt.statistics().embeddings.batches
        results = await concurrently(rt, texts)
        stats = rt.statistics().embeddings
        backend: Any = rt.backend
        decodes = (
            len(backend.embedding_batches) if kind == "fake" else backend.embedding_decodes
        )  # counted where the decodes happen
        alone = [await rt.embed(t) for t in texts]
    assert stats.batches - before == decodes < 8, (stats, decodes)
    assert stats.inputs == 8
    for got, want in zip(results, alone, strict=True):
        assert cosine(got.vectors[0], want.vectors[0]) > 0.9999


@BOTH
async def test_embedding_between_generation_steps_changes_no_answer(kind: str) -> None:
    """The embedding context is apart from the generating one: greedy answers are the same with
    embeddings decoded between their steps."""
    async with open_runtime(kind, slots=2, threads=2, fake={"step_delay_s": 0.002}) as rt:
        want = (await rt.complete(greedy("Once upon a time", max_tokens=24))).text
        async with anyio.create_task_group() as tg:
            answers: list[str] = []

            async def generate() -> None:
                answers.append((await rt.complete(greedy("Once upon a time", max_tokens=24))).text)

            tg.start_soon(generate)
            for _ in range(4):
                await rt.embed([ANCHOR, PARAPHRASE])
    assert answers == [want]


@BOTH
async def test_truncate_cuts_to_the_context_and_false_refuses(kind: str) -> None:
    long = "word " * 400  # more than 64 tokens on both backends
    async with open_runtime(kind, slots=1, n_ctx_per_slot=64, threads=2) as rt:
        cut = await rt.embed(long)
        with pytest.raises(
            ContextOverflowError, match=r"input\[1\] is (at least )?[\d,]+ tokens.*slot context is 64"
        ):
            await rt.embed(["short", long], truncate=False)
        with pytest.raises(ContextOverflowError, match=r"input\[0\] is at least"):  # bytes alone say so
            await rt.embed("x" * 100_000, truncate=False)
        again = await rt.embed("short")
    assert cut.input_tokens == [64] and cut.truncated == 1
    assert again.truncated == 0 and again.input_tokens[0] < 64


@BOTH
async def test_dimensions_cut_and_renormalise(kind: str) -> None:
    async with open_runtime(kind, slots=1, threads=2) as rt:
        whole = await rt.embed(ANCHOR)
        cut = await rt.embed(ANCHOR, dimensions=16)
        with pytest.raises(
            InvalidRequestError, match=f"dimensions is 10,000; this model's embeddings have {WIDTH[kind]}"
        ):
            await rt.embed(ANCHOR, dimensions=10_000)
    head = np.array(whole.vectors[0][:16])
    assert cut.dimensions == 16
    assert np.allclose(cut.vectors[0], head / np.linalg.norm(head), atol=1e-6)


@BOTH
async def test_token_arrays_embed_like_their_text(kind: str) -> None:
    async with open_runtime(kind, slots=1, threads=2) as rt:
        tokens = rt.backend.tokenize(ANCHOR, add_special=True, parse_special=False)
        by_text = await rt.embed(ANCHOR)
        by_tokens = await rt.embed([tokens])
        with pytest.raises(InvalidRequestError, match="token id -1"):
            await rt.embed([[5, -1]])
    assert cosine(by_text.vectors[0], by_tokens.vectors[0]) > 0.9999


@BOTH
async def test_bad_input_is_refused_and_the_runtime_keeps_serving(kind: str) -> None:
    async with open_runtime(kind, slots=1, threads=2) as rt:
        cases: list[tuple[list[Any], str]] = [
            ([], "inputs is empty"),
            (["ok", ""], r"input\[1\] is empty"),
            ([[]], "empty token array"),
        ]
        for bad, match in cases:
            with pytest.raises(InvalidRequestError, match=match):
                await rt.embed(bad)
        with pytest.raises(InvalidRequestError, match="dimensions is 0"):
            EmbedRequest(inputs=("a",), dimensions=0)
        with pytest.raises(InvalidRequestError, match="NUL"):
            await rt.embed("a\x00b")
        ok = await rt.embed("still serving")
        answer = await rt.complete(greedy("Hi", max_tokens=3))
    assert len(ok.vectors) == 1 and answer.stats.completion_tokens == 3


async def test_a_backend_without_embeddings_answers_a_typed_error() -> None:
    """The fake stands for a backend without embeddings (ctransformers raises the same)."""
    async with open_runtime("fake", slots=1, fake={"embeddings": False}) as rt:
        with pytest.raises(EmbeddingsUnsupportedError, match="does not support embeddings"):
            await rt.embed("hello")
        assert (await rt.complete(greedy("Hi", max_tokens=2))).stats.completion_tokens == 2


async def test_embeddings_are_counted_in_the_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from runtime import RuntimeConfig
    from runtime.backends.fake import FakeBackend

    registry = CollectorRegistry()
    async with Runtime(
        RuntimeConfig(backend="fake", slots=1), backend=FakeBackend(n_seq_max=1), registry=registry
    ) as rt:
        await rt.embed(["ab", "cde"])
        with pytest.raises(InvalidRequestError):
            await rt.embed([""])
        text = generate_latest(registry).decode()
    assert 'slotserve_embeddings_total{model="fake"} 2.0' in text
    assert 'slotserve_embedding_tokens_total{model="fake"} 5.0' in text
    assert 'slotserve_embedding_batches_total{model="fake"} 1.0' in text
    assert 'slotserve_embedding_requests_total{model="fake",outcome="completed"} 1.0' in text
    assert 'slotserve_embedding_requests_total{model="fake",outcome="failed"} 1.0' in text
