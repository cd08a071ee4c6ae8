"""The legacy backend: GGML model families and old-style GGUF files through ctransformers 0.2.27.

ctransformers has no model/context split: one library instance holds one sequence, nothing is
batched across sequences and no per-sequence state can be exported. So here every slot is its
own instance, the instances live in one worker process (runtime.backends.ctransformers.worker), and a
step evaluates the sequences in it one after another (the library is not thread-safe). The
model's facts say so (``ModelInfo.batched`` False, ``instances`` = slots, ``state_export``
False, CPU only), and its memory accounting counts the weights once where the instances map
the same file (GGUF with mmap) and once per instance where each reads its own copy (legacy).

What the library gets wrong is done here instead:

- tokenizing goes through the native call with a buffer large enough for any text (its Python
  ``tokenize`` overflows on byte-fallback tokens); special tokens written in the text (which
  it does not recognise) are cut out and inserted as ids;
- the context length is set explicitly to ``n_ctx_per_slot`` (it defaults to 512 for GGUF),
  and a step that would run past it is refused (the library would overwrite the cache's end);
- sampling is done with numpy from the logits, with one Generator per request seeded from the
  request's seed (runtime.backends.ctransformers.sampling), not by its sampler, which reseeds every token.

Crash isolation: a native crash kills only the worker. The step then raises WorkerDiedError,
the ModelActor fails the requests of that step, and the next step (or tokenize) starts a new
worker; sequences that still hold cells (prefix cache) are re-evaluated from the tokens kept
here, so their cells are what they were.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import gguf  # noqa: F401  (read_model_file needs it; fail at import, as a missing library should)
import msgspec
import numpy as np
import numpy.typing as npt

from runtime.backends.base import ModelInfo, SamplerSpec, StepPlan, StepResult, special_token_pattern
from runtime.backends.chat_template import ChatTemplate
from runtime.backends.ctransformers.cells import SequenceCells
from runtime.backends.ctransformers.model_file import ModelFile, read_model_file
from runtime.backends.ctransformers.process import WorkerDiedError, WorkerProcess
from runtime.backends.ctransformers.worker import LoadSpec, WorkerFacts
from runtime.backends.gguf_metadata import MetadataValue, read_gguf_metadata
from runtime.core.config import RuntimeConfig
from runtime.core.errors import ConfigError, EmbeddingsUnsupportedError, ModelLoadError

__all__ = ["CTransformersBackend", "CTransformersStatistics", "WorkerDiedError"]

if importlib.util.find_spec("ctransformers") is None:  # the worker imports it; say so here, early
    raise ImportError("No module named 'ctransformers'")

log = logging.getLogger("slotserve.ctransformers")
LOAD_TIMEOUT_S = 300.0
STEP_TIMEOUT_S = 600.0
"""A worker that does not answer a step in this time is taken for hung, killed and replaced."""
_LEGACY_SPECIAL = re.compile(rb"<\|[^|\s]{1,32}\|>")


def eval_threads(config: RuntimeConfig) -> int:
    """Threads for one native eval: ``config.threads`` if set, else half the usable cores.

    The bundled ggml's threads spin while they wait for each other, so a thread more than
    there are idle cores is ruinous: on 2 shared cores with a load of 6, one SmolLM2 token took
    30 ms on 1 thread and 1,500 ms on 2. Half leaves room for the event loop's process.
    """
    return config.threads or max(1, config.n_threads // 2)


class CTransformersStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The worker process and what it evaluated (counts in tokens)."""

    worker_pid: int | None
    instance_context_length: int
    """The context each instance was created with, as the library reports it (tokens)."""
    worker_starts: int
    worker_deaths: int
    tokens_evaluated: int
    tokens_replayed: int
    """Tokens evaluated again to rebuild cells a dead worker had held."""


class CTransformersBackend:
    """``config.slots`` (or ``n_seq``) ctransformers instances of the model at ``path``.

    :raises ModelLoadError: if the file is unknown to the library or cannot be loaded; the
        message says why where it is known (and how to convert a modern GGUF).
    :raises ConfigError: if GPU layers are asked for, or the file's context is shorter than
        ``config.n_ctx_per_slot``.
    """

    info: ModelInfo
    pieces: Sequence[bytes]
    eog_tokens: frozenset[int]
    chat_template: ChatTemplate | None
    max_token_bytes: int
    inline_tokenize = False  # its tokenizer is in the worker process

    def __init__(self, path: Path, config: RuntimeConfig, n_seq: int | None = None) -> None:
        if config.n_gpu_layers > 0:
            raise ConfigError(
                f"n_gpu_layers is {config.n_gpu_layers}; the ctransformers backend runs on the CPU "
                "(its CUDA build needs CUDA 12 libraries and targets old GPU generations only)"
            )
        self._file: ModelFile = read_model_file(path)
        self._n_ctx = config.n_ctx_per_slot
        n = n_seq or config.initial_slots
        self._spec = LoadSpec(
            path=str(path),
            model_type=self._file.model_type,
            instances=n,
            context_length=self._n_ctx,
            threads=eval_threads(config),
        )
        self._lock = threading.Lock()
        self._worker: WorkerProcess | None = None
        self._cells = SequenceCells(self._n_ctx, n)
        self._samplers: dict[int, SamplerSpec | None] = {}
        self._unsent_samplers: dict[int, SamplerSpec | None] = {}
        self._crash_next_step = False
        self._starts = self._deaths = self._evaluated = 0
        facts = self._start_worker(describe=True)
        self._instance_context = facts.context_length
        if facts.context_length < self._n_ctx:
            self.close()
            raise ConfigError(
                f"n_ctx_per_slot is {self._n_ctx:,}; the {self._file.model_type} file {path.name!r} "
                f"fixes its context at {facts.context_length:,} tokens"
            )
        self.pieces = self._pieces(facts)
        self.eog_tokens = frozenset({facts.eos_token, *facts.eos_tokens, *self._file.end_tokens})
        self._specials = self._special_tokens(facts)
        self._special_re = special_token_pattern(list(self._specials))
        self.max_token_bytes = max([len(p) for p in self.pieces] + [len(t.encode()) for t in self._specials])
        self._bos = self._file.bos_token if self._file.bos_token >= 0 else facts.bos_token
        self.chat_template = self._chat_template(facts)
        kv_cells = self._file.n_ctx_train if self._file.kv_sized_by_file else facts.context_length
        shared = self._file.weights_shared
        self.info = ModelInfo(
            name=self._file.name,
            path=str(path),
            backend="ctransformers",
            n_vocab=facts.n_vocab,
            n_layer=self._file.n_layer,
            n_ctx_train=self._file.n_ctx_train or facts.context_length,
            n_ctx_per_slot=self._n_ctx,
            n_seq_max=n,
            weights_bytes=self._file.weights_bytes,
            kv_bytes_per_slot=kv_cells * self._file.kv_bytes_per_token,
            gpu_layers=0,
            batched=False,
            state_export=False,
            instances=n,
            weights_copies=1 if shared else n,
            instance_bytes=0 if shared else self._file.weights_bytes,
            isolated=True,
            logprobs=False,
            constraints=False,
            seq_copy=False,
        )

    # -- the worker ----------------------------------------------------------------------------

    def _start_worker(self, *, describe: bool) -> WorkerFacts:
        """Start a worker and load the instances (call with the lock held, or from __init__)."""
        worker = WorkerProcess()
        try:
            facts = worker.call(("load", dataclasses.replace(self._spec, describe=describe)), LOAD_TIMEOUT_S)
        except (RuntimeError, OSError) as exc:
            worker.stop()
            raise ModelLoadError(f"ctransformers could not load {self._spec.path!r}: {exc}") from None
        assert isinstance(facts, WorkerFacts)
        self._worker = worker
        self._starts += 1
        self._cells.worker_lost()
        self._unsent_samplers = dict(self._samplers)  # a new worker knows none of them
        log.info(
            "ctransformers worker %d: %d instances of %s", facts.pid, self._spec.instances, self._spec.path
        )
        return facts

    def _live_worker(self) -> WorkerProcess:
        """The running worker, started anew if the last one died (lock held)."""
        if self._worker is None or not self._worker.alive:
            if self._worker is not None:
                self._worker.stop()
            self._start_worker(describe=False)
        assert self._worker is not None
        return self._worker

    def _died(self) -> None:
        """Account for a dead worker: its instances' cells are gone (lock held)."""
        self._deaths += 1
        self._cells.worker_lost()

    # -- vocabulary ----------------------------------------------------------------------------

    def _pieces(self, facts: WorkerFacts) -> list[bytes]:
        pieces = list(facts.pieces)
        for token, piece in self._file.piece_overrides.items():
            if token < len(pieces):
                pieces[token] = piece
        return pieces

    def _special_tokens(self, facts: WorkerFacts) -> dict[str, int]:
        if self._file.model_type == "gguf":
            return dict(self._file.special_tokens)
        return {
            piece.decode(): token
            for token, piece in enumerate(facts.pieces)
            if _LEGACY_SPECIAL.fullmatch(piece)
        }

    def _chat_template(self, facts: WorkerFacts) -> ChatTemplate | None:
        if not self._file.chat_template:
            return None

        def text(token: int) -> str:
            return next((t for t, i in self._specials.items() if i == token), "")

        return ChatTemplate(
            self._file.chat_template,
            bos_token=text(self._bos),
            eos_token=text(self._file.eos_token if self._file.eos_token >= 0 else facts.eos_token),
        )

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text``: with ``parse_special``, special tokens written in it become
        their ids, the text between them goes through the library's tokenizer; BOS first if the
        model wants it.

        :raises WorkerDiedError: if the worker dies meanwhile (the next call starts a new one).
        """
        parts: list[str | int] = []
        last = 0
        if parse_special and self._special_re is not None:
            for match in self._special_re.finditer(text):
                parts += [text[last : match.start()], self._specials[match.group()]]
                last = match.end()
        parts.append(text[last:])
        texts = [p for p in parts if isinstance(p, str) and p]
        with self._lock:
            worker = self._live_worker()
            try:
                native = worker.call(("tokenize", texts), STEP_TIMEOUT_S)
            except WorkerDiedError:
                self._died()
                raise
        assert isinstance(native, list)
        ids: list[int] = [self._bos] if add_special and self._file.add_bos and self._bos >= 0 else []
        pending = iter(native)
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
            elif part:
                ids += next(pending)
        return ids

    @property
    def special_tokens(self) -> dict[str, int]:
        """The texts of the vocabulary's special tokens -> their ids (see tokenize)."""
        return self._specials

    @property
    def special_pattern(self) -> re.Pattern[str] | None:
        """Matches any text of ``special_tokens`` (see tokenize)."""
        return self._special_re

    def metadata(self, *, max_array_items: int | None = None) -> dict[str, MetadataValue]:
        """A GGUF file's metadata, typed; for a legacy file, what its header says (its family as
        the architecture, its context and layers).

        :raises ModelLoadError: if a GGUF header cannot be read.
        """
        if self._file.model_type == "gguf":
            return read_gguf_metadata(self._file.path, max_array_items=max_array_items)
        arch = self._file.model_type
        return {
            "general.architecture": arch, "general.name": self._file.name,
            f"{arch}.context_length": self.info.n_ctx_train, f"{arch}.block_count": self._file.n_layer,
            f"{arch}.vocab_size": self.info.n_vocab,
        }  # fmt: skip

    # -- the step ------------------------------------------------------------------------------

    def step(self, plan: StepPlan) -> StepResult:
        """Trim, set samplers, evaluate each sequence on its instance in turn, sample its last row.

        :raises WorkerDiedError: if the worker process died (its requests are lost; the next
            step starts a new worker).
        :raises RuntimeError: if the plan asks for what an instance cannot do (a row other
            than a sequence's last sampled, a gap in positions, a run past n_ctx_per_slot), or
            the library fails to evaluate.
        """
        with self._lock:
            for seq_id, p0 in plan.trims:
                self._cells.trim(seq_id, p0)
            self._samplers.update(plan.samplers)
            self._unsent_samplers.update(plan.samplers)
            if plan.n_tokens == 0:
                return StepResult(tokens=np.empty(len(plan.output_rows), dtype=np.int32))
            evals, new_tokens = self._cells.evals(plan)
            worker = self._live_worker()
            crash, self._crash_next_step = self._crash_next_step, False
            try:
                reply = worker.call(("step", self._unsent_samplers, evals, crash), STEP_TIMEOUT_S)
            except WorkerDiedError:
                self._died()
                raise
            except RuntimeError:
                self._cells.worker_lost()  # some instances may hold part of this step: rebuild them
                raise
            self._unsent_samplers = {}
            self._cells.commit(new_tokens)
            self._evaluated += plan.n_tokens
        sampled, errors = cast(tuple[list[int], dict[int, str]], reply)
        index = {seq_id: i for i, seq_id in enumerate(s for s, _, _, sample in evals if sample)}
        out_seqs = plan.seq_ids[plan.output_rows].tolist()
        out = np.array([sampled[index[s]] for s in out_seqs], dtype=np.int32)
        row_errors: dict[int, BaseException] = {
            row: RuntimeError(f"sampling sequence {s} failed: {errors[index[s]]}")
            for row, s in enumerate(out_seqs)
            if index[s] in errors
        }
        return StepResult(tokens=out, row_errors=row_errors)

    def embed(self, inputs: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """Not available: ctransformers gives no pooled hidden states.

        :raises EmbeddingsUnsupportedError: always.
        """
        raise EmbeddingsUnsupportedError(
            f"the ctransformers backend cannot embed text (model {self.info.name!r}); use llama_cpp"
        )

    def seq_cells(self, seq_id: int) -> int:
        """Cells the sequence holds (tracked here; reading it takes no lock and no native call)."""
        return self._cells.held(seq_id)

    def resize(self, n_seq: int) -> int:
        """Hold ``n_seq`` instances: new ones are created, those from ``n_seq`` on are freed;
        the others keep their cells where they are (nothing is copied).

        :returns: bytes of KV state the kept sequences carry across (kept in place).
        :raises ModelLoadError: if a new instance cannot be created.
        """
        with self._lock:
            kept = self._cells.keep_below(n_seq)
            for seq_id in [s for s in self._samplers if s >= n_seq]:
                del self._samplers[seq_id]
            self._spec = dataclasses.replace(self._spec, instances=n_seq)
            if self._worker is not None and self._worker.alive:
                try:
                    self._worker.call(("resize", n_seq), LOAD_TIMEOUT_S)
                except WorkerDiedError:
                    self._died()
                except RuntimeError as exc:
                    raise ModelLoadError(f"ctransformers could not hold {n_seq} instances: {exc}") from None
        shared = self._file.weights_shared
        self.info = msgspec.structs.replace(
            self.info, n_seq_max=n_seq, instances=n_seq, weights_copies=1 if shared else n_seq
        )
        return kept * self._file.kv_bytes_per_token

    # -- tools and drills ----------------------------------------------------------------------

    def next_token_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits after ``tokens`` (float32, shape (n_vocab,)), evaluated on sequence 0's
        instance from position 0; sequence 0's cells are dropped. Use it while no request runs.

        :raises ValueError: if ``tokens`` is empty or longer than n_ctx_per_slot.
        """
        if not 0 < len(tokens) <= self._n_ctx:
            raise ValueError(f"{len(tokens)} tokens; 1 to {self._n_ctx:,} (n_ctx_per_slot) are allowed")
        with self._lock:
            self._cells.trim(0, 0)
            worker = self._live_worker()
            try:
                logits = worker.call(("logits", 0, 0, list(tokens)), STEP_TIMEOUT_S)
            except WorkerDiedError:
                self._died()
                raise
        assert isinstance(logits, np.ndarray)
        return logits

    def inject_native_crash(self) -> None:
        """Make the next step crash the worker: for GGUF models its first eval goes to the library
        with position -1 and fails ``GGML_ASSERT(n_past >= 0)``; legacy families have no such
        check, so there the worker aborts itself as a failed assertion does. For drills and tests."""
        self._crash_next_step = True

    def statistics(self) -> CTransformersStatistics:
        """A snapshot of the worker and token counts."""
        worker = self._worker
        return CTransformersStatistics(
            worker_pid=worker.pid if worker is not None and worker.alive else None,
            instance_context_length=self._instance_context,
            worker_starts=self._starts,
            worker_deaths=self._deaths,
            tokens_evaluated=self._evaluated,
            tokens_replayed=self._cells.replayed,
        )

    def close(self) -> None:
        """Stop the worker (it frees the instances)."""
        with self._lock:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None
