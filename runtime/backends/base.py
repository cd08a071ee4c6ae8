"""The backend protocol: what the ModelActor needs from an inference library.

All methods are blocking and are called from worker threads, never from the event loop.
``step`` and the sequence operations run on one thread at a time (the ModelActor's);
``tokenize``, the chat template and ``metadata`` only read the vocabulary or the file and may run
on any worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import msgspec
import numpy as np
import numpy.typing as npt

from runtime.backends.chat_template import ChatTemplate
from runtime.backends.gguf_metadata import MetadataValue

__all__ = [
    "EMBED_MAX_SEQUENCES",
    "Backend",
    "MetadataValue",
    "ModelInfo",
    "SamplerSpec",
    "SequenceStates",
    "StepLogprobs",
    "StepPlan",
    "StepResult",
    "special_token_pattern",
]


EMBED_MAX_SEQUENCES = 64
"""Inputs one embedding decode carries at most (sequences of the embedding context)."""


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a loaded model is and what it costs; sizes in bytes, lengths in tokens."""

    name: str
    path: str
    backend: str
    n_vocab: int
    n_layer: int
    n_ctx_train: int
    n_ctx_per_slot: int
    n_seq_max: int
    weights_bytes: int
    kv_bytes_per_slot: int
    """n_ctx_per_slot x n_layer x (n_embd_k_gqa + n_embd_v_gqa) x bytes per element."""
    gpu_layers: int
    compute_bytes: int = 0
    """Compute and output buffers of the current context, as the backend reports them."""
    batched: bool = True
    """One decode evaluates every busy sequence together (False: one after another)."""
    state_export: bool = True
    """A sequence's KV cells can be saved and restored (llama_state_seq_get/set_data)."""
    instances: int = 1
    """Library instances loaded: 1 where one context holds every sequence, else one per slot."""
    weights_copies: int = 1
    """Times the weights are resident: 1 where instances share them (mmap), else ``instances``."""
    instance_bytes: int = 0
    """Bytes one more slot costs beyond its KV cache (an instance's own copy of the weights)."""
    isolated: bool = False
    """The model runs in a worker process: a native crash there fails its requests only."""
    embedding_length: int = 0
    """Floats in one embedding vector; 0 when the backend or model cannot embed (``embed``
    raises EmbeddingsUnsupportedError)."""
    logprobs: bool = True
    """Its steps give log-probabilities for the output rows that ask (``StepPlan.logprob_outputs``)."""
    seq_copy: bool = True
    """Its steps copy a sequence's KV cells to another (``StepPlan.copies``)."""
    constraints: bool = True
    """Its steps mask a row's logits to what its grammar allows (``SamplerSpec.grammar``): JSON
    output, grammars and tool calls."""


class SamplerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A sampler chain for one sequence (llama.cpp order: penalties, top-k, top-p, min-p, temp)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None
    """An llguidance grammar the output must match (runtime.core.structured): the row's logits
    are masked to the tokens it allows before choosing, at any temperature."""

    @property
    def greedy(self) -> bool:
        """True when the choice is an argmax (of the masked logits, with a grammar)."""
        return (
            self.temperature == 0
            and self.repeat_penalty == 1.0
            and not (self.presence_penalty or self.frequency_penalty)
        )


@dataclass(slots=True)
class StepPlan:
    """One step: sequence housekeeping, then one batched decode, then sampling.

    ``tokens``, ``positions`` and ``seq_ids`` have shape (n_tokens,); ``output_rows`` has shape
    (n_outputs,) and lists the batch rows whose logits are sampled, in the order of the results.
    """

    tokens: npt.NDArray[np.int32]
    positions: npt.NDArray[np.int32]
    seq_ids: npt.NDArray[np.int32]
    output_rows: npt.NDArray[np.int32]
    trims: list[tuple[int, int]] = field(default_factory=list)
    """(seq_id, p0): remove the sequence's KV cells at positions >= p0, before decoding."""
    samplers: dict[int, SamplerSpec | None] = field(default_factory=dict)
    """seq_id -> new sampler for that sequence (None: greedy argmax), set before decoding."""
    copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst): after the trims, before decoding, make dst's KV cells a copy of all of src's
    (llama_memory_seq_cp); dst shares src's prompt (n > 1)."""
    sample_seqs: npt.NDArray[np.int32] | None = None
    """Shape (n_outputs,): whose sampler picks each output; None: the output row's own sequence.
    Given, ``output_rows`` may name a row more than once (sequences that share its prompt)."""
    n_prompt_tokens: int = 0
    """Of ``tokens``, how many are prompt (prefill) tokens; the rest are one per decoding sequence."""
    n_sequences: int = 0
    """Sequences with tokens in this step."""
    logprob_outputs: npt.NDArray[np.int32] | None = None
    """Indices into ``output_rows`` whose log-probabilities are wanted, shape (m,); None: none."""
    top_logprobs: int = 0
    """How many most likely tokens each of ``logprob_outputs`` gets (the most any of them asked)."""

    @property
    def n_tokens(self) -> int:
        """Tokens decoded in this step."""
        return int(self.tokens.shape[0])


@dataclass(slots=True)
class StepLogprobs:
    """Log-probabilities (natural log, of the raw logits' softmax) of some outputs of a step:
    ``outputs`` (m,) indexes the step's outputs, ``chosen`` (m,) is each sampled token's,
    ``top_ids`` and ``top_logprobs`` (m, k) the k most likely tokens, most likely first."""

    outputs: npt.NDArray[np.int32]
    chosen: npt.NDArray[np.float32]
    top_ids: npt.NDArray[np.int32]
    top_logprobs: npt.NDArray[np.float32]


@dataclass(slots=True)
class StepResult:
    """Sampled tokens, shape (n_outputs,), errors of single rows (row index -> error), and the
    log-probabilities of the outputs that asked for them (``StepPlan.logprob_outputs``)."""

    tokens: npt.NDArray[np.int32]
    row_errors: dict[int, BaseException] = field(default_factory=dict)
    logprobs: StepLogprobs | None = None


@runtime_checkable
class Backend(Protocol):
    """A loaded model with one context of ``info.n_seq_max`` sequences."""

    @property
    def info(self) -> ModelInfo:
        """What the model is and what it costs; replaced when the context is resized."""

    @property
    def pieces(self) -> Sequence[bytes]:
        """Token id -> the bytes it stands for (a table read on the event loop; no native call)."""

    @property
    def eog_tokens(self) -> frozenset[int]:
        """End-of-generation token ids (EOS, EOT, ...)."""

    @property
    def inline_tokenize(self) -> bool:
        """Its tokenizer runs in this process in microseconds: a short prompt may be tokenized
        on the event loop (actors.prompt.INLINE_PROMPT_CHARS) instead of in a thread."""

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template (sandboxed; see chat_template.py), or None if it has none."""

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """The text of each special (control) token -> its id."""

    @property
    def special_pattern(self) -> re.Pattern[str] | None:
        """Matches any text of ``special_tokens``, longest first (None if there are none)."""

    @property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for (special tokens' texts included): a text
        of B bytes is at least B / max_token_bytes tokens."""

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text``; BOS first if ``add_special`` and the model wants one. With
        ``parse_special`` the texts of special tokens written in it become those tokens; without
        it they are plain text (what a user sent)."""

    def metadata(self, *, max_array_items: int | None = None) -> dict[str, MetadataValue]:
        """The model's metadata, key -> value, as GGUF names them (``general.architecture``,
        ``general.file_type``, ``<arch>.context_length``, ``<arch>.block_count``, ...), with
        ``general.parameter_count`` added where the file lacks it (as Ollama adds it). An array
        of more than ``max_array_items`` items is given as an empty list (None: every array
        whole). May read the model file: call it from a worker thread (any one).

        :raises ModelLoadError: if the file's metadata cannot be read.
        """

    def step(self, plan: StepPlan) -> StepResult:
        """Apply trims and samplers, decode ``plan`` in one batch, sample every output row.

        :raises RuntimeError: if the decode itself fails (the whole step is lost).
        """

    def embed(self, inputs: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """The pooled embedding of each token list, shape (len(inputs), info.embedding_length),
        not normalised, from one decode of every list as its own sequence. At most
        EMBED_MAX_SEQUENCES lists of ``info.n_ctx_per_slot`` tokens in all. Called on the step
        loop's thread only (between two steps); the generating context is not touched.

        :raises EmbeddingsUnsupportedError: if ``info.embedding_length`` is 0.
        :raises RuntimeError: if the decode fails, or no embedding context can be built.
        """

    def seq_cells(self, seq_id: int) -> int:
        """KV cells the sequence holds now (0 when it holds none)."""

    def resize(self, n_seq: int) -> int:
        """Make the context hold ``n_seq`` sequences, keeping the weights and the cells of
        sequences below both counts; cells of sequences from ``n_seq`` on are dropped.

        :returns: bytes of sequence state carried to the new context.
        :raises NotImplementedError: if this backend cannot change its sequence count.
        """

    def close(self) -> None:
        """Free the context and the weights."""


@runtime_checkable
class SequenceStates(Protocol):
    """A backend whose sequences' KV state can be saved to host memory and restored into any
    sequence (``info.state_export``): the host-RAM prompt cache (actors.host_cache) and
    preemption (actors.preemption). Called on the step loop's thread only, between two steps."""

    def save_seq(self, seq_id: int) -> bytes:
        """The KV state of the sequence's cells (llama_state_seq_get_data)."""

    def load_seq(self, seq_id: int, state: bytes) -> None:
        """Replace the sequence's cells by those ``state`` (from :meth:`save_seq` of any
        sequence) holds.

        :raises RuntimeError: if the state could not be restored.
        """

    def park_sampler(self, seq_id: int) -> object:
        """Take the sequence's sampler out as it is (its chain, its random state, a grammar's
        matcher), for :meth:`unpark_sampler`; the sequence is left with none (a preempted
        request's, actors.preemption)."""

    def unpark_sampler(self, seq_id: int | None, parked: object) -> None:
        """Give sequence ``seq_id`` the sampler :meth:`park_sampler` took (what it had is
        freed); ``seq_id`` None frees ``parked`` (its request ended while parked)."""


def special_token_pattern(texts: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern matching any of ``texts`` (special tokens' texts), longest first; None for none."""
    texts = [t for t in texts if t]
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))
