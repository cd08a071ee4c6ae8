"""A deterministic test double of a model: scripted tokens, settable delay, memory and faults.

Tokens: id 0 is EOS, ids 1 to 256 are the bytes 0 to 255 (so any text tokenizes, byte by
byte), and ids from 257 on are the ``extra_pieces`` given. The fake keeps a real KV cache of
its own (each sequence's tokens by position) and refuses a decode at a position that does not
follow the sequence's last cell, so runtime bookkeeping errors show up as failures.

Without a script, the next token is a letter chosen by a hash of the sequence's whole history,
so outputs depend on every earlier token of that sequence and of no other (as in a real model).
A ``scripts`` entry makes a prompt generate exactly the given token ids, then EOS.

Embeddings are a hashed bag of tokens: each token adds +1 or -1 to one of 64 dimensions, both
chosen by a hash of its id, so that texts sharing bytes point alike, and a vector depends on its
own input only (the same alone and in any batch).

A sampler with a penalty (repeat, presence or frequency) steers clear of the letters among its
last ``repeat_last_n`` tokens: the next letter of the alphabet that is not among them is taken.

A sampler with a grammar (runtime.backends.grammar) takes, among the tokens the grammar allows,
the end of generation if allowed, else the first allowed of ``"}],:`` (so that answers close
soon), else the letter its history's hash picks if allowed, else the allowed token of the
lowest id: deterministic, and always a valid continuation.

Log-probabilities, where asked, come from made-up logits that depend only on the sequence's
history (a generator seeded by its hash), with the sampled token made the most likely one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import msgspec
import numpy as np
import numpy.typing as npt

from runtime.backends.base import ModelInfo, SamplerSpec, StepPlan, StepResult
from runtime.backends.chat_template import ChatTemplate
from runtime.backends.gguf_metadata import MetadataValue
from runtime.backends.grammar import GrammarRows, byte_tokenizer
from runtime.backends.logprobs import step_logprobs
from runtime.core.errors import EmbeddingsUnsupportedError, GenerationError, ResizeFailedError

__all__ = ["EOS", "FakeBackend", "InjectedFault"]

EOS = 0
_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
"""A ChatML-like rendering, ending at the assistant's turn."""
_BYTE0 = 1
_N_EMBD = 64
"""The embedding width its metadata reports (it has no weights; a tied 64-wide embedding)."""
_LETTERS = np.array([_BYTE0 + c for c in b"abcdefghijklmnopqrstuvwxyz "], dtype=np.int32)
_CLOSERS = [_BYTE0 + c for c in b'"}],:']


class InjectedFault(RuntimeError):
    """Raised by the fake backend where a test asked for a fault."""


class FakeBackend:
    """A model double that runs in microseconds; see the module docstring.

    :param scripts: prompt text -> token ids to generate for it (then EOS).
    :param extra_pieces: bytes of the token ids 257, 258, ... for scripts to use.
    :param step_delay_s: seconds each step sleeps, as if computing.
    :param fault_prompts: prompts whose sequence fails (InjectedFault on its own row only)
        when it samples its ``fault_after``-th token.
    :param resize_fails_above: a resize to more sequences than this raises ResizeFailedError
        and changes nothing (as a context too big for the GPU's memory).
    :param gpu_layers: the layers it reports on a GPU (above 0, ``memory_source="auto"`` reads
        NVML, as for a model on a GPU).
    :param embeddings: whether it can embed (False: as a backend without embeddings).
    """

    inline_tokenize = True

    def __init__(
        self,
        *,
        n_seq_max: int = 4,
        n_ctx_per_slot: int = 2048,
        scripts: Mapping[str, Sequence[int]] | None = None,
        extra_pieces: Sequence[bytes] = (),
        step_delay_s: float = 0.0,
        weights_bytes: int = 100 << 20,
        kv_bytes_per_slot: int = 1 << 20,
        fault_prompts: Sequence[str] = (),
        fault_after: int = 2,
        resize_fails_above: int | None = None,
        gpu_layers: int = 0,
        embeddings: bool = True,
    ) -> None:
        self.pieces: list[bytes] = [b""] + [bytes([b]) for b in range(256)] + list(extra_pieces)
        self.eog_tokens = frozenset({EOS})
        self.special_tokens: dict[str, int] = {}
        self.special_pattern = None
        self.max_token_bytes = max(1, *(len(p) for p in self.pieces))
        self.chat_template = ChatTemplate(_TEMPLATE, bos_token="", eos_token="")
        self.info = ModelInfo(
            name="fake",
            path="fake",
            backend="fake",
            n_vocab=len(self.pieces),
            n_layer=1,
            n_ctx_train=n_ctx_per_slot,
            n_ctx_per_slot=n_ctx_per_slot,
            n_seq_max=n_seq_max,
            weights_bytes=weights_bytes,
            kv_bytes_per_slot=kv_bytes_per_slot,
            gpu_layers=gpu_layers,
            embedding_length=_N_EMBD if embeddings else 0,
        )
        self.step_delay_s = step_delay_s
        self.resize_fails_above = resize_fails_above
        self.fault_after = fault_after
        self._scripts = {tuple(self._encode(p)): list(s) for p, s in (scripts or {}).items()}
        self._faults = [tuple(self._encode(p)) for p in fault_prompts]
        self._cells: dict[int, list[int]] = {}
        self._hashes: dict[int, list[int]] = {}
        self._samplers: dict[int, np.random.Generator | None] = {}
        self._penalized: dict[int, tuple[int, list[int]]] = {}
        """seq_id -> (repeat_last_n, tokens its sampler produced) for a sampler with a penalty."""
        self.grammar = GrammarRows(
            lambda: byte_tokenizer(self.pieces, EOS, lambda data: [_BYTE0 + b for b in data]),
            len(self.pieces),
        )
        self.fail_next_steps = 0
        """Make this many coming steps raise InjectedFault as a whole (a ModelActor fault)."""
        self.call_threads: set[int] = set()
        """Ids of every thread that called into the backend, tokenizing apart."""
        self.tokenize_threads: set[int] = set()
        """Ids of every thread that tokenized."""
        self.steps = 0
        self.resizes: list[int] = []
        """Sequence counts of every resize, in order."""
        self.sequences_per_step: list[int] = []
        self.embedding_batches: list[int] = []
        """Inputs of every embedding decode, in order."""
        self.copies = 0
        """Sequence copies made (n > 1: a choice sharing another's prompt)."""
        self.closed = False

    @staticmethod
    def _encode(text: str) -> list[int]:
        return [_BYTE0 + b for b in text.encode()]

    def _touch(self) -> None:
        self.call_threads.add(threading.get_ident())

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """One token per UTF-8 byte; no BOS, no special tokens."""
        self.tokenize_threads.add(threading.get_ident())
        return self._encode(text)

    def metadata(self, *, max_array_items: int | None = None) -> dict[str, MetadataValue]:
        """Metadata as a GGUF file of a tiny F32 model would have it: architecture ``fake``,
        its context, layers and vocabulary, a parameter count of a 64-wide tied embedding."""
        arch, n_vocab = "fake", self.info.n_vocab
        tokens: list[MetadataValue] = [p.decode(errors="replace") for p in self.pieces]
        if max_array_items is not None and len(tokens) > max_array_items:
            tokens = []
        return {
            "general.architecture": arch, "general.type": "model", "general.name": self.info.name,
            "general.file_type": 0, "general.quantization_version": 2,
            "general.parameter_count": n_vocab * _N_EMBD,
            f"{arch}.context_length": self.info.n_ctx_train, f"{arch}.embedding_length": _N_EMBD,
            f"{arch}.block_count": self.info.n_layer, f"{arch}.vocab_size": n_vocab,
            "tokenizer.ggml.model": "bytes", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.eos_token_id": EOS, "tokenizer.chat_template": _TEMPLATE,
        }  # fmt: skip

    def step(self, plan: StepPlan) -> StepResult:
        """Trim, set samplers, append the batch to each sequence's cells, sample each output."""
        self._touch()
        for seq_id, p0 in plan.trims:
            if seq_id >= self.info.n_seq_max:
                continue  # dropped by a resize, as in llama.cpp
            del self._cells.setdefault(seq_id, [])[p0:]
            del self._hashes.setdefault(seq_id, [])[p0:]
        for src, dst in plan.copies:  # the whole of src's cells, as llama_memory_seq_cp(-1, -1)
            if src < self.info.n_seq_max and dst < self.info.n_seq_max:
                self._cells[dst] = list(self._cells.get(src, []))
                self._hashes[dst] = list(self._hashes.get(src, []))
        self.copies += len(plan.copies)
        for seq_id, spec in plan.samplers.items():
            self.grammar.set(seq_id, None if spec is None else spec.grammar)
            self._samplers[seq_id] = self._new_sampler(spec)
            self._penalized.pop(seq_id, None)
            if spec is not None and (
                spec.repeat_penalty != 1 or spec.presence_penalty or spec.frequency_penalty
            ):
                self._penalized[seq_id] = (spec.repeat_last_n, [])
        if plan.n_tokens == 0:
            return StepResult(tokens=np.empty(0, dtype=np.int32))
        if self.fail_next_steps > 0:
            self.fail_next_steps -= 1
            raise InjectedFault("injected fault in the whole step")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.steps += 1
        self.sequences_per_step.append(len(set(plan.seq_ids.tolist())))
        for token, pos, seq_id in zip(
            plan.tokens.tolist(), plan.positions.tolist(), plan.seq_ids.tolist(), strict=True
        ):
            if seq_id >= self.info.n_seq_max:
                raise RuntimeError(f"decode in sequence {seq_id}; the context has {self.info.n_seq_max}")
            cells, hashes = self._cells.setdefault(seq_id, []), self._hashes.setdefault(seq_id, [])
            if pos != len(cells):
                raise RuntimeError(f"sequence {seq_id}: decode at position {pos}, cells end at {len(cells)}")
            cells.append(token)
            hashes.append(((hashes[-1] if hashes else 17) * 1_000_003 + token) & 0xFFFFFFFF)
        out = np.empty(len(plan.output_rows), dtype=np.int32)
        errors: dict[int, BaseException] = {}
        samplers = plan.sample_seqs
        for i, row in enumerate(plan.output_rows.tolist()):
            seq_id = int(plan.seq_ids[row])
            try:
                out[i] = self._next_token(seq_id, seq_id if samplers is None else int(samplers[i]))
            except (InjectedFault, GenerationError) as exc:
                errors[i] = exc
                out[i] = EOS
        lp = plan.logprob_outputs
        logprobs = None
        if lp is not None and len(lp):
            seqs = plan.seq_ids[plan.output_rows[lp]].tolist()
            logits = self._logits([self._hashes[s][-1] for s in seqs], out[lp])
            logprobs = step_logprobs(lp, logits, out[lp], plan.top_logprobs)
        return StepResult(tokens=out, row_errors=errors, logprobs=logprobs)

    def _logits(self, hashes: list[int], chosen: np.ndarray) -> np.ndarray:
        """Made-up logits, shape (len(hashes), n_vocab): a function of each history's hash, with
        the chosen token 2 above the rest."""
        n_vocab = self.info.n_vocab
        logits = np.stack([np.random.default_rng(h).standard_normal(n_vocab) for h in hashes]).astype(
            np.float32
        )
        rows = np.arange(len(hashes))
        logits[rows, chosen] = logits.max(axis=1) + 2.0
        return logits

    def _new_sampler(self, spec: SamplerSpec | None) -> np.random.Generator | None:
        return None if spec is None or spec.temperature == 0 else np.random.default_rng(spec.seed)

    def _next_token(self, seq_id: int, sampler_seq: int) -> int:
        """The next token of ``seq_id``'s cells, chosen by ``sampler_seq``'s sampler."""
        cells = self._cells[seq_id]
        for prompt, script in self._scripts.items():
            if tuple(cells[: len(prompt)]) == prompt:
                done = len(cells) - len(prompt)
                return script[done] if done < len(script) else EOS
        for prompt in self._faults:
            if tuple(cells[: len(prompt)]) == prompt and len(cells) - len(prompt) + 1 >= self.fault_after:
                raise InjectedFault(f"injected fault in sequence {seq_id}")
        rng = self._samplers.get(sampler_seq)
        h = self._hashes[seq_id][-1]
        if rng is not None:
            h ^= int(rng.integers(0, 1 << 16))
        token = int(_LETTERS[h % len(_LETTERS)])
        if sampler_seq in self.grammar.matchers:
            token = self._allowed_token(sampler_seq, token)
            self.grammar.advance(sampler_seq, token)
            return token
        if (penalty := self._penalized.get(sampler_seq)) is not None:
            last_n, produced = penalty
            recent = set(produced[-last_n:]) if last_n > 0 else set()
            for step in range(len(_LETTERS)):
                token = int(_LETTERS[(h + step) % len(_LETTERS)])
                if token not in recent:
                    break
            produced.append(token)
        return token

    def _allowed_token(self, seq_id: int, letter: int) -> int:
        """The token a constrained sequence takes (see the module docstring)."""
        allowed = self.grammar.allowed([self.grammar.matchers[seq_id]])[0]
        for token in (EOS, *_CLOSERS, letter):
            if allowed[token]:
                return token
        ids = np.flatnonzero(allowed)
        if not len(ids):
            raise InjectedFault(f"sequence {seq_id}: the grammar allows no token")
        return int(ids[0])

    def embed(self, inputs: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """A hashed bag of each input's tokens (see the module docstring), shape (len(inputs), 64),
        not normalised; one "decode" (it sleeps ``step_delay_s``).

        :raises EmbeddingsUnsupportedError: if made with ``embeddings=False``.
        """
        self._touch()
        if self.info.embedding_length == 0:
            raise EmbeddingsUnsupportedError("the fake backend was made without embeddings")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.embedding_batches.append(len(inputs))
        out = np.zeros((len(inputs), _N_EMBD), dtype=np.float32)
        for row, tokens in zip(out, inputs, strict=True):
            h = (np.asarray(tokens, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(97)) % np.uint64(
                1 << 32
            )
            np.add.at(
                row,
                (h % np.uint64(_N_EMBD)).astype(np.intp),
                np.where((h >> np.uint64(6)) & np.uint64(1), 1.0, -1.0),
            )
        return out

    def resize(self, n_seq: int) -> int:
        """Keep sequences below ``n_seq``; as llama.cpp, sizes are fixed until the next resize."""
        self._touch()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.resize_fails_above is not None and n_seq > self.resize_fails_above:
            raise ResizeFailedError(f"no context of {n_seq} sequences fits (resize_fails_above)")
        for seq_id in [s for s in self._cells if s >= n_seq]:
            del self._cells[seq_id], self._hashes[seq_id]
        self.info = msgspec.structs.replace(self.info, n_seq_max=n_seq)
        self.resizes.append(n_seq)
        return sum(4 * len(c) for c in self._cells.values())

    def save_seq(self, seq_id: int) -> bytes:
        """The sequence's state (its cells and their history hashes, int64 each), as
        llama_state_seq_get_data gives it: restored by :meth:`load_seq` into any sequence."""
        self._touch()
        cells, hashes = self._cells.get(seq_id, []), self._hashes.get(seq_id, [])
        return np.asarray(cells + hashes, dtype="<i8").tobytes()

    def load_seq(self, seq_id: int, state: bytes) -> None:
        """Make the sequence's cells those ``state`` (from :meth:`save_seq`) holds.

        :raises RuntimeError: if ``state`` is not such a state.
        """
        self._touch()
        values = np.frombuffer(state, dtype="<i8").tolist()
        if len(state) % 16:
            raise RuntimeError(f"a sequence state of {len(state)} bytes is not the fake's")
        half = len(values) // 2
        self._cells[seq_id], self._hashes[seq_id] = values[:half], values[half:]

    def park_sampler(self, seq_id: int) -> object:
        """The sequence's random state, penalty history and grammar matcher, taken out as they are."""
        self._touch()
        return (
            self._samplers.pop(seq_id, None),
            self._penalized.pop(seq_id, None),
            self.grammar.matchers.pop(seq_id, None),
        )

    def unpark_sampler(self, seq_id: int | None, parked: object) -> None:
        """Give ``seq_id`` the parked sampler (its own is dropped); None: drop the parked one."""
        self._touch()
        assert isinstance(parked, tuple)
        if seq_id is None:
            return
        rng, penalty, matcher = parked
        self._samplers[seq_id] = rng
        for table, value in ((self._penalized, penalty), (self.grammar.matchers, matcher)):
            table.pop(seq_id, None)
            if value is not None:
                table[seq_id] = value

    def seq_cells(self, seq_id: int) -> int:
        """Cells the sequence holds."""
        self._touch()
        return len(self._cells.get(seq_id, ()))

    def close(self) -> None:
        """Drop every sequence."""
        self._touch()
        self._cells.clear()
        self._hashes.clear()
        self.closed = True
