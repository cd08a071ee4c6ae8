"""The default backend: GGUF models through llama-cpp-python's low-level API (pinned 0.3.36).

One ``llama_model`` (the weights) and one ``llama_context`` with ``n_seq_max`` = slots and a
KV cache of ``n_ctx_per_slot`` cells per sequence (``kv_unified`` off: each sequence has its
own part). A step fills one ``llama_batch`` from numpy arrays in bulk, calls ``llama_decode``
once, reads all logits at once, takes one argmax over every greedy row and runs each other
row's llama.cpp sampler chain (penalties, top-k, top-p, min-p, temperature, dist); the rows that
ask for log-probabilities get them in bulk from the same logits (runtime.backends.logprobs).

Embeddings come from a second context on the same weights (no second load), made on first use,
with ``embeddings`` on and the GGUF's pooling (``<arch>.pooling_type``; mean where the file names
none, as SmolLM2's does). It holds ``n_ctx_per_slot`` cells shared by its sequences and decodes
one ubatch of as many tokens, so that each input is pooled whole; its memory is cleared after
every decode. llama.cpp evaluates an embedding batch one sequence per ubatch (``split_seq``), so
batching saves the calls and their set-up, not the matrix work.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp as llama
import msgspec
import numpy as np
import numpy.typing as npt

from runtime.backends.base import (
    EMBED_MAX_SEQUENCES,
    ModelInfo,
    SamplerSpec,
    StepPlan,
    StepResult,
    special_token_pattern,
)
from runtime.backends.chat_template import ChatTemplate
from runtime.backends.gguf_metadata import MetadataValue, read_gguf_metadata
from runtime.backends.grammar import GrammarRows
from runtime.backends.logprobs import step_logprobs
from runtime.core.config import RuntimeConfig
from runtime.core.errors import EmbeddingsUnsupportedError, GenerationError, ModelLoadError, ResizeFailedError

__all__ = ["LlamaCppBackend"]

log = logging.getLogger("slotserve.llama_cpp")
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
KV_TYPES = {
    # name: (ggml type, bytes per element: a q8_0 block is 32 values in 34 bytes, q4_0 in 18)
    "f16": (llama.GGML_TYPE_F16, 2.0),
    "q8_0": (llama.GGML_TYPE_Q8_0, 34 / 32),
    "q4_0": (llama.GGML_TYPE_Q4_0, 18 / 32),
}


_BUFFER_LINE = re.compile(r"(\w+)\s+(compute|output) buffer size =\s+([\d.]+) MiB")
_buffers = threading.local()
"""Per thread: bytes of the compute and output buffers llama.cpp reports while it builds a
context (the C API has no call for them; its log line is the report)."""


@llama.llama_log_callback  # type: ignore[untyped-decorator]
def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    line = text.decode(errors="replace").rstrip()
    if (m := _BUFFER_LINE.search(line)) and hasattr(_buffers, "bytes"):
        _buffers.bytes += int(float(m.group(3)) * 2**20)
    if level >= 3 or log.isEnabledFor(logging.DEBUG):
        log.log(_LEVELS.get(level, logging.DEBUG), line)


_init_lock = threading.Lock()
_initialized = False


def init_llama() -> None:
    """Start llama.cpp once per process, with its log going to Python logging."""
    global _initialized
    with _init_lock:
        if not _initialized:
            llama.llama_log_set(_log, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _initialized = True


def kv_bytes_per_slot(backend: LlamaCppBackend, n_ctx_per_slot: int, kv_type: str) -> int:
    """n_ctx_per_slot x n_layer x (n_embd_k_gqa + n_embd_v_gqa) x bytes per element."""
    meta = backend._meta
    model = backend._model
    arch = meta("general.architecture") or "llama"
    n_embd = llama.llama_model_n_embd(model)
    n_head = llama.llama_model_n_head(model)
    n_head_kv = llama.llama_model_n_head_kv(model)
    k_dim = int(meta(f"{arch}.attention.key_length") or n_embd // n_head)
    v_dim = int(meta(f"{arch}.attention.value_length") or n_embd // n_head)
    per_cell_layer = (k_dim + v_dim) * n_head_kv * KV_TYPES[kv_type][1]
    return int(n_ctx_per_slot * llama.llama_model_n_layer(model) * per_cell_layer)


_SPLIT_MODES = {
    "none": llama.LLAMA_SPLIT_MODE_NONE,
    "layer": llama.LLAMA_SPLIT_MODE_LAYER,
    "row": llama.LLAMA_SPLIT_MODE_ROW,
}


def load_weights(path: Path, gpu_layers: int, config: RuntimeConfig | None = None) -> Any:
    """``llama_model_load_from_file`` with ``gpu_layers`` layers on the GPU (-1: all of them
    when this build has one), placed on the GPUs as ``config``'s split_mode, main_gpu and
    tensor_split say (llama.cpp's defaults without it); a null pointer when llama.cpp cannot
    load the file."""
    init_llama()
    mparams = llama.llama_model_default_params()
    mparams.n_gpu_layers = gpu_layers if gpu_layers >= 0 else (999 if gpu_offload_supported() else 0)
    split = None
    if config is not None:
        mparams.split_mode = _SPLIT_MODES[config.split_mode]
        mparams.main_gpu = config.main_gpu
        if shares := config.tensor_shares:
            most = llama.llama_max_devices()
            if len(shares) > most:
                raise ModelLoadError(
                    f"tensor_split names {len(shares)} GPUs; this llama.cpp takes at most {most}"
                )
            split = (ctypes.c_float * most)(*shares)  # alive until loaded
            mparams.tensor_split = split
    return llama.llama_model_load_from_file(str(path).encode(), mparams)


def context_params(
    *, n_ctx_per_slot: int, n_seq: int, n_batch: int, n_threads: int, kv_cache_type: str = "f16"
) -> Any:
    """The ``llama_context_params`` of a context of ``n_seq`` sequences of ``n_ctx_per_slot``
    cells each, its own part of the KV cache per sequence (``kv_unified`` off); ``n_batch`` is
    raised to ``n_seq`` so that one token of every sequence fits one step."""
    n_batch = max(n_batch, n_seq)
    cparams = llama.llama_context_default_params()
    cparams.n_ctx = n_ctx_per_slot * n_seq
    cparams.n_batch = n_batch
    cparams.n_ubatch = min(n_batch, 512)
    cparams.n_seq_max = n_seq
    cparams.n_threads = cparams.n_threads_batch = n_threads
    cparams.kv_unified = False
    cparams.no_perf = True
    cparams.type_k = cparams.type_v = KV_TYPES[kv_cache_type][0]
    if kv_cache_type != "f16":
        cparams.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED  # a quantized V needs it
    return cparams


def _is_special(vocab: Any, token: int) -> bool:
    """Whether ``token`` is a control or user-defined token (what llama.cpp's parse_special parses)."""
    attr = llama.llama_vocab_get_attr(vocab, token)
    return bool(attr & (llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_USER_DEFINED))


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build can put layers on a GPU."""
    return bool(llama.llama_supports_gpu_offload())


class LlamaCppBackend:
    """A GGUF model (weights loaded once) and one context of ``n_seq`` sequences.

    :param n_seq: sequences (slots) of the first context; :meth:`resize` makes a new context.
    :raises ModelLoadError: if the file cannot be loaded or the context cannot be created.
    """

    inline_tokenize = True  # llama.cpp tokenizes a short text in tens of microseconds

    def __init__(self, path: Path, config: RuntimeConfig, n_seq: int | None = None) -> None:
        self._config = config
        self._samplers: dict[int, Any] = {}
        self._sampler_faults: dict[int, BaseException] = {}
        """seq_id -> why its sampler could not be made (its next output fails with it)."""
        self.sampling_seconds = 0.0
        """Time the steps spent choosing tokens from the logits (argmax and sampler chains)."""
        self._ctx: Any = None
        self._embed_ctx: Any = None
        self.embedding_decodes = 0
        """llama_decode calls of the embedding context."""
        self.embedding_compute_bytes = 0
        """Compute and output buffers of the embedding context (0 until it is made)."""
        gpu_layers = config.n_gpu_layers
        if gpu_layers < 0:
            gpu_layers = 999 if gpu_offload_supported() else 0
        self._model = load_weights(path, gpu_layers, config)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {str(path)!r} (is it a GGUF file?)")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self.pieces = [self._piece(t) for t in range(self._n_vocab)]
        self.eog_tokens = frozenset(
            t for t in range(self._n_vocab) if llama.llama_vocab_is_eog(self._vocab, t)
        )
        specials = {self._special_text(t): t for t in range(self._n_vocab) if _is_special(self._vocab, t)}
        self.special_tokens = {text: token for text, token in specials.items() if text}
        self.special_pattern = special_token_pattern(self.special_tokens)
        self.max_token_bytes = max(
            [len(p) for p in self.pieces] + [len(t.encode()) for t in self.special_tokens]
        )
        self.grammar = GrammarRows(self._grammar_tokenizer, self._n_vocab)
        template = llama.llama_model_chat_template(self._model, None)
        self.chat_template = (
            ChatTemplate(
                template.decode(errors="replace"),
                eos_token=self._special_text(llama.llama_vocab_eos(self._vocab)),
                bos_token=self._special_text(llama.llama_vocab_bos(self._vocab)),
            )
            if template
            else None
        )
        n_layer = llama.llama_model_n_layer(self._model)
        self._n_params = int(llama.llama_model_n_params(self._model))
        self.info = ModelInfo(
            name=self._meta("general.name") or path.stem,
            path=str(path),
            backend="llama_cpp",
            n_vocab=self._n_vocab,
            n_layer=n_layer,
            n_ctx_train=llama.llama_model_n_ctx_train(self._model),
            n_ctx_per_slot=config.n_ctx_per_slot,
            n_seq_max=0,
            weights_bytes=int(llama.llama_model_size(self._model)),
            kv_bytes_per_slot=kv_bytes_per_slot(self, config.n_ctx_per_slot, config.kv_cache_type),
            gpu_layers=min(gpu_layers, n_layer + 1),
        )
        self._pooling = self._embedding_pooling()
        if self._pooling is not None:
            self.info = msgspec.structs.replace(
                self.info, embedding_length=int(llama.llama_model_n_embd(self._model))
            )
        try:
            self._create_context(n_seq or config.initial_slots)
        except ModelLoadError:
            llama.llama_model_free(self._model)
            raise

    def _create_context(self, n_seq: int) -> None:
        config = self._config
        cparams = context_params(
            n_ctx_per_slot=config.n_ctx_per_slot, n_seq=n_seq, n_batch=config.n_batch,
            n_threads=config.n_threads, kv_cache_type=config.kv_cache_type,
        )  # fmt: skip
        _buffers.bytes = 0
        ctx = llama.llama_init_from_model(self._model, cparams)
        compute_bytes = _buffers.bytes
        del _buffers.bytes
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {n_seq} x {config.n_ctx_per_slot} tokens "
                f"({config.kv_cache_type} KV cache)"
            )
        self._ctx = ctx
        self._mem = llama.llama_get_memory(ctx)
        self._batch = NumpyBatch(cparams.n_batch)
        self.info = msgspec.structs.replace(self.info, n_seq_max=n_seq, compute_bytes=compute_bytes)

    def resize(self, n_seq: int) -> int:
        """Replace the context by one of ``n_seq`` sequences, keeping the weights and carrying
        the KV cells of sequences ``0 .. min(old, new) - 1`` across (llama_state_seq_get_data /
        llama_state_seq_set_data); the cells of sequences from ``n_seq`` on are dropped.

        The new context is built beside the old one where memory allows, else in its place; if
        neither builds, a context of the old count is built again and its sequences restored.

        :returns: bytes of sequence state carried.
        :raises ResizeFailedError: if no context of ``n_seq`` could be built (the old count
            serves on, its sequences carried back).
        :raises ModelLoadError: if not even the old count could be built again (the context
            is lost).
        :raises RuntimeError: if a sequence's state could not be restored.
        """
        old = self.info.n_seq_max
        saved = self._save_states(min(old, n_seq))
        old_ctx = self._ctx
        try:
            self._create_context(n_seq)  # beside the old one
        except ModelLoadError:
            self._ctx = None
            llama.llama_free(old_ctx)
            old_ctx = None
            try:
                self._create_context(n_seq)  # in its place
            except ModelLoadError as exc:
                self._create_context(old)  # back to what served (raises if even that fails)
                self._restore(saved, old, old)
                raise ResizeFailedError(str(exc)) from None
        if old_ctx is not None:
            llama.llama_free(old_ctx)
        return self._restore(saved, old, n_seq)

    def _save_states(self, n: int) -> list[tuple[int, bytes]]:
        """The KV state of each non-empty sequence below ``n``, as llama.cpp writes it."""
        states: list[tuple[int, bytes]] = []
        for seq in range(n):
            if self.seq_cells(seq) == 0:
                continue
            size = llama.llama_state_seq_get_size(self._ctx, seq)
            buf = (ctypes.c_uint8 * size)()
            written = llama.llama_state_seq_get_data(self._ctx, buf, size, seq)
            states.append((seq, bytes(buf)[:written]))
        return states

    def _restore(self, saved: list[tuple[int, bytes]], n_old: int, n_new: int) -> int:
        """Put ``saved`` (from a context of ``n_old`` sequences) into the current one of
        ``n_new``; returns the bytes carried."""
        carried = 0
        for seq, raw in saved:
            state = restream(raw, seq, n_old, n_new)
            src = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            if llama.llama_state_seq_set_data(self._ctx, src, len(state), seq) != len(state):
                raise RuntimeError(
                    f"could not restore sequence {seq} ({len(state)} bytes) into the new context"
                )
            carried += len(state)
        return carried

    def save_seq(self, seq_id: int) -> bytes:
        """The sequence's KV state (llama_state_seq_get_data); :meth:`load_seq` restores it."""
        size = llama.llama_state_seq_get_size(self._ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data(self._ctx, buf, size, seq_id)
        return bytes(buf)[:written]

    def load_seq(self, seq_id: int, state: bytes) -> None:
        """Replace the sequence's cells by those of ``state`` (saved from any sequence of this
        context), re-addressed to ``seq_id``'s KV stream (llama_state_seq_set_data).

        :raises RuntimeError: if llama.cpp does not take the whole state.
        """
        if len(state) < 12:
            raise RuntimeError(f"a saved state of {len(state)} bytes is too short")
        _, src_seq, n_old = np.frombuffer(state[:12], dtype="<u4").tolist()  # saved before a resize too
        moved = readdress(state, src_seq, n_old, seq_id, self.info.n_seq_max)
        src = (ctypes.c_uint8 * len(moved)).from_buffer_copy(moved)
        if llama.llama_state_seq_set_data(self._ctx, src, len(moved), seq_id) != len(moved):
            raise RuntimeError(f"could not restore a saved state ({len(moved)} bytes) into sequence {seq_id}")

    def park_sampler(self, seq_id: int) -> object:
        """The sequence's sampler chain, grammar matcher and sampler fault, taken out as they are."""
        return (
            self._samplers.pop(seq_id, None),
            self.grammar.matchers.pop(seq_id, None),
            self._sampler_faults.pop(seq_id, None),
        )

    def unpark_sampler(self, seq_id: int | None, parked: object) -> None:
        """Give ``seq_id`` the parked sampler (freeing its own); None: free the parked chain."""
        assert isinstance(parked, tuple)
        chain, matcher, fault = parked
        if seq_id is None:
            if chain is not None:
                llama.llama_sampler_free(chain)
            return
        self._set_sampler(seq_id, None)
        for table, value in (
            (self._samplers, chain),
            (self.grammar.matchers, matcher),
            (self._sampler_faults, fault),
        ):
            if value is not None:
                table[seq_id] = value

    # -- embeddings ----------------------------------------------------------------------------

    def _embedding_pooling(self) -> int | None:
        """The pooling of the embedding context: the GGUF's ``<arch>.pooling_type`` (mean where it
        names none); None for a model that gives no vector per sequence (a reranker's ``rank``
        pooling, an encoder-decoder model)."""
        if llama.llama_model_has_encoder(self._model):
            return None
        arch = self._meta("general.architecture") or "llama"
        named = self._meta(f"{arch}.pooling_type")
        pooling = int(named) if named and named.lstrip("-").isdigit() else llama.LLAMA_POOLING_TYPE_NONE
        if pooling == llama.LLAMA_POOLING_TYPE_RANK:
            return None
        if pooling in (llama.LLAMA_POOLING_TYPE_NONE, llama.LLAMA_POOLING_TYPE_UNSPECIFIED):
            return int(llama.LLAMA_POOLING_TYPE_MEAN)
        return pooling

    def _embedding_context(self) -> Any:
        """The embedding context, made on first use (see the module docstring).

        :raises RuntimeError: if llama.cpp cannot make it.
        """
        if self._embed_ctx is not None:
            return self._embed_ctx
        n_tokens = self._config.n_ctx_per_slot
        cparams = llama.llama_context_default_params()
        cparams.embeddings = True
        assert self._pooling is not None
        cparams.pooling_type = self._pooling
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_tokens  # an input in one ubatch
        cparams.n_seq_max = EMBED_MAX_SEQUENCES
        cparams.kv_unified = True  # the sequences share the cells; cleared after each decode
        cparams.n_threads = cparams.n_threads_batch = self._config.n_threads
        cparams.no_perf = True
        _buffers.bytes = 0
        ctx = llama.llama_init_from_model(self._model, cparams)
        self.embedding_compute_bytes = _buffers.bytes
        del _buffers.bytes
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create an embedding context of {n_tokens:,} tokens")
        log.info(
            "embedding context: %d tokens, %d sequences, pooling %d, %.1f MiB of compute buffers",
            n_tokens, EMBED_MAX_SEQUENCES, self._pooling, self.embedding_compute_bytes / 2**20,
        )  # fmt: skip
        self._embed_ctx = ctx
        self._embed_batch = NumpyBatch(n_tokens)
        return ctx

    def embed(self, inputs: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """The pooled embedding of each token list, shape (len(inputs), embedding_length), from
        one llama_decode of every list as its own sequence (llama_get_embeddings_seq), not
        normalised; then the context's memory is cleared (llama_memory_clear).

        :raises EmbeddingsUnsupportedError: if the model gives no vector per sequence.
        :raises ValueError: if the lists hold more than n_ctx_per_slot tokens in all, or are
            more than EMBED_MAX_SEQUENCES.
        :raises RuntimeError: if the context cannot be made, the decode fails, or a vector is
            missing.
        """
        width = self.info.embedding_length
        if width == 0:
            raise EmbeddingsUnsupportedError(
                f"model {self.info.name!r} cannot embed text (its pooling gives no vector per input)"
            )
        lengths = np.array([len(t) for t in inputs], dtype=np.int32)
        n_tokens, capacity = int(lengths.sum()), self._config.n_ctx_per_slot
        if n_tokens > capacity or len(inputs) > EMBED_MAX_SEQUENCES or n_tokens == 0:
            raise ValueError(
                f"an embedding batch of {len(inputs)} inputs and {n_tokens:,} tokens; the limits are "
                f"{EMBED_MAX_SEQUENCES} and {capacity:,}"
            )
        ctx = self._embedding_context()
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        plan = StepPlan(
            tokens=np.fromiter((t for ts in inputs for t in ts), dtype=np.int32, count=n_tokens),
            positions=(np.arange(n_tokens, dtype=np.int32) - starts).astype(np.int32),
            seq_ids=np.repeat(np.arange(len(inputs), dtype=np.int32), lengths),
            output_rows=np.arange(n_tokens, dtype=np.int32),
        )
        self._embed_batch.fill(plan)
        try:
            rc = llama.llama_decode(ctx, self._embed_batch.struct)
            self.embedding_decodes += 1
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} for an embedding batch of {n_tokens} tokens")
            out = np.empty((len(inputs), width), dtype=np.float32)
            for seq in range(len(inputs)):
                vector = llama.llama_get_embeddings_seq(ctx, seq)
                if not vector:
                    raise RuntimeError(f"llama.cpp gave no embedding for sequence {seq}")
                out[seq] = np.ctypeslib.as_array(vector, shape=(width,))
        finally:
            llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
        return out

    # -- model facts ---------------------------------------------------------------------------

    def metadata(self, *, max_array_items: int | None = None) -> dict[str, MetadataValue]:
        """The GGUF file's metadata, typed (read from its header: llama.cpp gives strings and
        leaves arrays out), with ``general.parameter_count`` from llama.cpp where it lacks it.

        :raises ModelLoadError: if the header cannot be read.
        """
        meta = read_gguf_metadata(self.info.path, max_array_items=max_array_items)
        meta.setdefault("general.parameter_count", self._n_params)
        return meta

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = llama.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _special_text(self, token: int) -> str:
        return self._piece(token, special=True).decode(errors="replace") if token >= 0 else ""

    def _grammar_tokenizer(self) -> Any:
        """llguidance's tokenizer of this vocabulary: each token's bytes (a special token's
        text behind a 0xff byte, llguidance's mark of special tokens) and llama.cpp's tokenizer."""
        import llguidance

        tokens = [
            b"\xff" + self._piece(t, special=True) if _is_special(self._vocab, t) else self.pieces[t]
            for t in range(self._n_vocab)
        ]
        tokenize = ctypes.cast(llama.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
        from_llamacpp = getattr(llguidance.LLTokenizer, "from_llamacpp")  # noqa: B009 (not in its stubs)
        return from_llamacpp(
            tokens=tokens, vocab_ptr=self._vocab, tokenize_fptr=tokenize, eos_token=sorted(self.eog_tokens)
        )

    # -- text ----------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text`` (llama_tokenize; special tokens in it parsed if ``parse_special``)."""
        data = text.encode()
        n_max = len(data) + 8
        buf = (llama.llama_token * n_max)()
        n = llama.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (llama.llama_token * n_max)()
            n = llama.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    # -- the step ------------------------------------------------------------------------------

    def step(self, plan: StepPlan) -> StepResult:
        """Trim, set samplers, decode the batch once, sample every output row.

        :raises RuntimeError: if llama_decode fails (its return code is in the message).
        """
        n_seq = self.info.n_seq_max
        for seq_id, p0 in plan.trims:
            if seq_id < n_seq:  # a sequence dropped by a resize has nothing left to trim
                llama.llama_memory_seq_rm(self._mem, seq_id, p0, -1)
        for src, dst in plan.copies:
            # Each sequence has a KV stream of its own (kv_unified off): llama.cpp copies the
            # whole stream, which it allows only for the whole range (-1, -1), at the next decode.
            if src < n_seq and dst < n_seq:
                llama.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        for seq_id, spec in plan.samplers.items():
            self._set_sampler(seq_id, spec)
        n_out = len(plan.output_rows)
        out = np.empty(n_out, dtype=np.int32)
        if plan.n_tokens == 0:
            return StepResult(tokens=out)
        self._batch.fill(plan)
        rc = llama.llama_decode(self._ctx, self._batch.struct)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {plan.n_tokens} tokens")
        sampling_from = time.perf_counter()
        if plan.sample_seqs is None:  # one output per row: logits row i is output i
            seq_ids, logit_of = plan.seq_ids[plan.output_rows], None
            n_logits = n_out
        else:  # rows shared by sequences with one prompt (n > 1): map outputs to logits rows
            seq_ids = plan.sample_seqs
            unique_rows, logit_of = np.unique(plan.output_rows, return_inverse=True)
            n_logits = len(unique_rows)
        logits = np.ctypeslib.as_array(llama.llama_get_logits(self._ctx), shape=(n_logits * self._n_vocab,))
        logits = logits.reshape(n_logits, self._n_vocab)
        lp = plan.logprob_outputs
        raw = None
        if lp is not None and len(lp):  # a copy, before any grammar's mask
            raw = logits[lp] if logit_of is None else logits[logit_of[lp]]
        errors: dict[int, BaseException] = {}
        constrained: list[int] = []
        if self.grammar.matchers or self._sampler_faults:
            constrained, errors = self._mask(seq_ids, logits, logit_of, n_out)
        chains = [self._samplers.get(int(s)) for s in seq_ids]
        greedy = np.array([c is None for c in chains], dtype=bool)
        if greedy.any():
            out[greedy] = np.argmax(logits[greedy] if logit_of is None else logits[logit_of[greedy]], axis=1)
        for i in np.flatnonzero(~greedy).tolist():
            try:
                out[i] = llama.llama_sampler_sample(chains[i], self._ctx, int(plan.output_rows[i]))
            except Exception as exc:  # one row's sampler must not fail the others
                errors[i] = exc
                out[i] = 0
        for i in constrained:
            try:
                self.grammar.advance(int(seq_ids[i]), int(out[i]))
            except Exception as exc:
                errors[i] = exc
        logprobs = None
        if raw is not None and lp is not None:
            logprobs = step_logprobs(lp, raw, out[lp], plan.top_logprobs)
        self.sampling_seconds += time.perf_counter() - sampling_from
        return StepResult(tokens=out, row_errors=errors, logprobs=logprobs)

    def _mask(
        self, seq_ids: npt.NDArray[np.int32], logits: npt.NDArray[np.float32], logit_of: Any, n_out: int
    ) -> tuple[list[int], dict[int, BaseException]]:
        """Mask the constrained outputs' logits in place (runtime.backends.grammar); an output
        whose sampler could not be made fails with why."""
        seqs = seq_ids.tolist()
        errors = {i: self._sampler_faults.pop(s) for i, s in enumerate(seqs) if s in self._sampler_faults}
        rows = np.arange(n_out) if logit_of is None else logit_of
        constrained = [i for i in self.grammar.mask(seqs, logits, rows) if i not in errors]
        return constrained, errors

    def _set_sampler(self, seq_id: int, spec: SamplerSpec | None) -> None:
        old = self._samplers.pop(seq_id, None)
        if old is not None:
            llama.llama_sampler_free(old)
        self._sampler_faults.pop(seq_id, None)
        try:
            self.grammar.set(seq_id, None if spec is None else spec.grammar)
        except Exception as exc:  # this request's grammar: its first output fails, no other
            self._sampler_faults[seq_id] = GenerationError(str(exc))
            return
        if spec is None or (spec.grammar is not None and spec.greedy):
            return  # an argmax (of the masked logits, with a grammar)
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = llama.llama_sampler_chain_add
        if spec.repeat_penalty != 1.0 or spec.frequency_penalty != 0 or spec.presence_penalty != 0:
            # The binding still declares a leading n_vocab that the C function no longer takes;
            # penalty_last_n goes first so that the native call reads it either way (the ints and
            # the floats travel in registers of their own: the three floats land where the C
            # function reads penalty_repeat, penalty_freq and penalty_present).
            n = spec.repeat_last_n
            penalties = llama.llama_sampler_init_penalties(
                n, n, spec.repeat_penalty, spec.frequency_penalty, spec.presence_penalty
            )
            add(chain, penalties)
        if spec.temperature == 0:
            add(chain, llama.llama_sampler_init_greedy())
        else:
            add(chain, llama.llama_sampler_init_top_k(spec.top_k))
            add(chain, llama.llama_sampler_init_top_p(spec.top_p, 1))
            add(chain, llama.llama_sampler_init_min_p(spec.min_p, 1))
            add(chain, llama.llama_sampler_init_temp(spec.temperature))
            add(chain, llama.llama_sampler_init_dist(spec.seed))
        self._samplers[seq_id] = chain

    def seq_cells(self, seq_id: int) -> int:
        """KV cells of the sequence (llama_memory_seq_pos_max - pos_min + 1; 0 if none)."""
        hi = llama.llama_memory_seq_pos_max(self._mem, seq_id)
        lo = llama.llama_memory_seq_pos_min(self._mem, seq_id)
        return 0 if hi < 0 else hi - lo + 1

    def close(self) -> None:
        """Free samplers, the context and the weights."""
        for chain in self._samplers.values():
            llama.llama_sampler_free(chain)
        self._samplers.clear()
        self.grammar.clear()
        if self._embed_ctx:
            llama.llama_free(self._embed_ctx)
            self._embed_ctx = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None


def restream(state: bytes, seq: int, n_old: int, n_new: int) -> bytes:
    """Re-address a sequence's saved KV state to a context of ``n_new`` sequences (see
    :func:`readdress`).

    :raises RuntimeError: if the state does not have the pinned layout.
    """
    return readdress(state, seq, n_old, seq, n_new)


def readdress(state: bytes, seq: int, n_old: int, new_seq: int, n_new: int) -> bytes:
    """Re-address sequence ``seq``'s saved KV state from a context of ``n_old`` sequences to
    sequence ``new_seq`` of one of ``n_new``: with ``kv_unified`` off, llama.cpp keeps one KV
    stream per sequence and writes a cell count for every stream (0 for all but the sequence's
    own), and refuses a state whose stream count differs from the context's. The layout is that
    of the pinned llama.cpp: u32 magic, u32 seq_id, u32 n_stream, then one block per stream.

    :raises RuntimeError: if the state does not have that layout.
    """
    header = np.frombuffer(state[:12], dtype="<u4")
    tail = 4 * (n_old - seq - 1)
    body = state[12:]
    empty_before, empty_after = body[: 4 * seq], body[len(body) - tail :] if tail else b""
    if header[1] != seq or header[2] != n_old or any(empty_before) or any(empty_after):
        raise RuntimeError(f"sequence {seq}: unexpected KV state layout (header {header.tolist()})")
    own = body[4 * seq : len(body) - tail]
    new_header = np.array([header[0], new_seq, n_new], dtype="<u4").tobytes()
    return new_header + bytes(4 * new_seq) + own + bytes(4 * (n_new - new_seq - 1))


class NumpyBatch:
    """A ``llama_batch`` of up to ``capacity`` tokens whose arrays are numpy arrays (int32
    ``tokens``, ``pos`` and ``seq``, int8 ``logits``; one sequence a token), filled in bulk;
    ``struct`` is what ``llama_decode`` takes (set its ``n_tokens``)."""

    def __init__(self, capacity: int) -> None:
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        self.seq_ptrs = self.seq.ctypes.data + 4 * np.arange(capacity, dtype=np.uint64)
        self.struct = llama.llama_batch()
        s: Any = self.struct  # ctypes pointers into the numpy arrays above
        s.token = self.tokens.ctypes.data_as(ctypes.POINTER(llama.llama_token))
        s.embd = None
        s.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama.llama_pos))
        s.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        s.seq_id = self.seq_ptrs.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(llama.llama_seq_id)))
        s.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def fill(self, plan: StepPlan) -> None:
        n = plan.n_tokens
        self.tokens[:n] = plan.tokens
        self.pos[:n] = plan.positions
        self.seq[:n] = plan.seq_ids
        self.logits[:n] = 0
        self.logits[plan.output_rows] = 1
        self.struct.n_tokens = n
