"""Embedder: embedding requests batched into decodes on the step loop's thread.

The one thread that touches a backend's contexts is the ModelActor's, so every embedding decode
runs there, between two steps (``ModelActor.post``). Requests put their inputs (token lists) in
a queue; while one decode runs, more gather, and the next decode takes every input waiting, up
to ``max_tokens`` tokens and ``max_sequences`` inputs (the embedding context's size), each its
own sequence. One decode at a time: the next is posted when the last one's vectors are back on
the event loop, so that generation steps run between two embedding decodes. A request whose
inputs span decodes gets its vectors when the last one is done; a cancelled request's inputs
still waiting are skipped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import numpy as np
import numpy.typing as npt

from actors.model import ModelActor
from actors.prompt import INLINE_PROMPT_CHARS
from runtime.backends.base import EMBED_MAX_SEQUENCES, Backend
from runtime.core.errors import (
    ContextOverflowError,
    EmbeddingsUnsupportedError,
    GenerationError,
    InvalidRequestError,
    SlotserveError,
)
from runtime.core.messages import Embeddings, EmbedRequest
from runtime.core.records import EmbeddingBatchReport, EmbeddingStatistics

__all__ = ["Embedder", "tokenize_inputs"]

Vectors = npt.NDArray[np.float32]


def tokenize_inputs(backend: Backend, request: EmbedRequest, n_ctx: int) -> tuple[list[list[int]], int]:
    """The token lists of ``request``'s inputs (blocking for long texts: call it off the event
    loop), each at most ``n_ctx`` tokens, and how many were cut to that. A text gets the
    model's BOS/EOS where it wants them (llama_tokenize's add_special); token arrays are taken as
    they are.

    :raises ContextOverflowError: if an input is longer than ``n_ctx`` and the request does not
        truncate (a text whose bytes alone say so is refused before it is tokenized).
    :raises InvalidRequestError: if a token id is outside the vocabulary, or a text has no tokens.
    """
    n_vocab, max_bytes = backend.info.n_vocab, max(1, backend.max_token_bytes)
    lists: list[list[int]] = []
    truncated = 0
    for i, item in enumerate(request.inputs):
        if isinstance(item, str):
            size = len(item.encode())
            if not request.truncate and -(-size // max_bytes) > n_ctx:
                why = f"{size:,} bytes of text; no token of this model stands for more than {max_bytes} bytes"
                raise ContextOverflowError(
                    -(-size // max_bytes), 0, n_ctx, at_least=why, subject=f"input[{i}]"
                )
            tokens = backend.tokenize(item, add_special=True, parse_special=False)
            if not tokens:
                raise InvalidRequestError(f"input[{i}] has no tokens after tokenizing; it needs at least one")
        else:
            tokens = list(item)
            bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"input[{i}] holds token id {bad}; ids must be 0 to {n_vocab - 1:,} (the vocabulary)"
                )
        if len(tokens) > n_ctx:
            if not request.truncate:
                raise ContextOverflowError(len(tokens), 0, n_ctx, subject=f"input[{i}]")
            tokens = tokens[:n_ctx]
            truncated += 1
        lists.append(tokens)
    return lists, truncated


@dataclass(eq=False)
class _Job:
    """One request's inputs and the vectors gathered so far."""

    inputs: list[list[int]]
    vectors: Vectors
    future: asyncio.Future[Vectors]
    loop: asyncio.AbstractEventLoop
    left: int
    cancelled: bool = False


_Unit = tuple[_Job, int]
"""One input of a job (its index)."""


@dataclass(eq=False)
class _Outcome:
    units: list[_Unit]
    vectors: Vectors | None
    error: BaseException | None
    report: EmbeddingBatchReport


class Embedder:
    """Embeds token lists through ``model``'s backend, batching what waits (module docstring).

    :param max_tokens: tokens one decode carries at most (the embedding context's cells).
    :param on_batch: called on the event loop with each decode's report; it must not raise.
    """

    def __init__(
        self,
        model: ModelActor,
        *,
        max_tokens: int,
        max_sequences: int = EMBED_MAX_SEQUENCES,
        on_batch: Callable[[EmbeddingBatchReport], None] | None = None,
    ) -> None:
        self._model = model
        self._max_tokens = max_tokens
        self._max_sequences = max_sequences
        self._on_batch = on_batch
        self._waiting: deque[_Unit] = deque()
        self._lock = threading.Lock()
        self._posted = False
        self._batches = self._inputs = self._tokens = self._largest = self._failed = 0
        self._seconds = 0.0

    async def run(self, request: EmbedRequest, n_ctx: int) -> Embeddings:
        """``request``'s vectors: its inputs tokenized (off the event loop when long), cut to
        ``n_ctx`` tokens or refused, decoded with what else waits, cut to ``dimensions`` and
        L2-normalised (as Ollama normalises: by max(norm, 1e-12)).

        :raises EmbeddingsUnsupportedError: if the backend cannot embed.
        :raises InvalidRequestError: if dimensions is above the model's embedding length, or an
            input is bad (see :func:`tokenize_inputs`).
        :raises ContextOverflowError: if an input is too long and the request does not truncate.
        :raises GenerationError: if the decode failed or gave NaN or infinite values.
        """
        start = time.perf_counter_ns()
        backend = self._model.backend
        width = backend.info.embedding_length
        if width == 0:
            raise EmbeddingsUnsupportedError(
                f"model {backend.info.name!r} ({backend.info.backend} backend) does not support embeddings"
            )
        wanted = request.dimensions
        if wanted is not None and wanted > width:
            raise InvalidRequestError(
                f"dimensions is {wanted:,}; this model's embeddings have {width:,} (embedding_length)"
            )
        size = sum(len(i) if isinstance(i, str) else 4 * len(i) for i in request.inputs)
        if size <= INLINE_PROMPT_CHARS:
            lists, truncated = tokenize_inputs(backend, request, n_ctx)
        else:
            lists, truncated = await anyio.to_thread.run_sync(tokenize_inputs, backend, request, n_ctx)
        vectors = await self.embed(lists)
        cut = wanted is not None and wanted < width
        if cut:
            vectors = vectors[:, :wanted]
        if request.normalize or cut:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if not np.isfinite(vectors).all():
            raise GenerationError("the model gave an embedding with NaN or infinite values")
        return Embeddings(
            vectors=vectors.tolist(),
            input_tokens=[len(t) for t in lists],
            truncated=truncated,
            dimensions=int(vectors.shape[1]),
            total_duration_ns=time.perf_counter_ns() - start,
        )

    async def embed(self, inputs: list[list[int]]) -> Vectors:
        """The pooled vectors of ``inputs``, shape (len(inputs), embedding_length), not normalised.
        Each list holds 1 to ``max_tokens`` tokens.

        :raises EmbeddingsUnsupportedError: if the backend cannot embed.
        :raises GenerationError: if the decode failed.
        """
        loop = asyncio.get_running_loop()
        width = self._model.backend.info.embedding_length
        job = _Job(
            inputs=inputs,
            vectors=np.empty((len(inputs), width), dtype=np.float32),
            future=loop.create_future(),
            loop=loop,
            left=len(inputs),
        )
        with self._lock:
            self._waiting.extend((job, i) for i in range(len(inputs)))
            post, self._posted = not self._posted, True
        if post:
            self._model.post(self._decode)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def _take(self) -> list[_Unit]:
        """Under the lock: the inputs of the next decode, in order, within the limits."""
        units: list[_Unit] = []
        tokens = 0
        waiting = self._waiting
        while waiting and len(units) < self._max_sequences:
            job, i = waiting[0]
            if job.cancelled:
                waiting.popleft()
                continue
            n = len(job.inputs[i])
            if units and tokens + n > self._max_tokens:
                break
            waiting.popleft()
            units.append((job, i))
            tokens += n
        return units

    def _decode(self) -> None:
        """On the step loop's thread: one decode of what waits; the vectors go to the event loop."""
        with self._lock:
            units = self._take()
            if not units:
                self._posted = False
                return
        lists = [job.inputs[i] for job, i in units]
        start = time.perf_counter()
        vectors: Vectors | None = None
        error: BaseException | None = None
        try:
            vectors = self._model.backend.embed(lists)
        except SlotserveError as exc:
            error = exc
        except Exception as exc:  # a failed decode fails its inputs' requests, not the step loop
            error = GenerationError(f"the embedding decode failed ({exc!r})")
        seconds = time.perf_counter() - start
        n_tokens = sum(map(len, lists))
        self._batches += 1
        self._failed += error is not None
        self._inputs += len(units)
        self._tokens += n_tokens
        self._largest = max(self._largest, len(units))
        self._seconds += seconds
        report = EmbeddingBatchReport(n_inputs=len(units), n_tokens=n_tokens, seconds=seconds)
        outcome = _Outcome(units=units, vectors=vectors, error=error, report=report)
        try:
            units[0][0].loop.call_soon_threadsafe(self._delivered, outcome)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            with self._lock:
                self._posted = False

    def _delivered(self, outcome: _Outcome) -> None:
        """On the event loop: hand each input's vector to its request; post the next decode."""
        if self._on_batch is not None:
            self._on_batch(outcome.report)
        for k, (job, i) in enumerate(outcome.units):
            if job.future.done() or job.cancelled:
                continue
            if outcome.error is not None:
                job.future.set_exception(outcome.error)
                job.cancelled = True  # its inputs still waiting are skipped
                continue
            assert outcome.vectors is not None
            job.vectors[i] = outcome.vectors[k]
            job.left -= 1
            if job.left == 0:
                job.future.set_result(job.vectors)
        with self._lock:
            more = bool(self._waiting)
            self._posted = more
        if more:
            self._model.post(self._decode)

    def statistics(self) -> EmbeddingStatistics:
        """A snapshot of the decode counters."""
        return EmbeddingStatistics(
            batches=self._batches,
            inputs=self._inputs,
            tokens=self._tokens,
            seconds_total=self._seconds,
            largest_batch=self._largest,
            waiting=len(self._waiting),
            failed_batches=self._failed,
        )
