"""The ctransformers worker process: one library instance per slot, evaluated one at a time.

Run as ``python -m runtime.backends.ctransformers.worker FD``, where FD is the worker's end of a socket
pair; the parent (runtime.backends.ctransformers) sends requests and reads replies over it as
pickled tuples (multiprocessing.connection). A native crash here (a failed GGML_ASSERT aborts
the process) ends only this process: the parent sees the connection close, fails the step,
and starts a new worker.

Requests and their replies (``("ok", value)`` or ``("error", message)``):

- ``("load", LoadSpec)`` -> WorkerFacts: create ``spec.instances`` instances of the model.
- ``("tokenize", [text, ...])`` -> [[token id, ...], ...]: the library's own tokenizer, called
  with a buffer large enough for any text (its Python ``tokenize`` allocates too few slots).
- ``("step", samplers, evals, crash)`` -> (tokens, row_errors): set samplers, then for each
  ``(seq_id, n_past, tokens, sample)`` evaluate the tokens on that sequence's instance from
  position ``n_past`` and, if ``sample``, draw its next token. ``crash`` makes the first eval
  go to the library with n_past = -1, which fails its ``GGML_ASSERT(n_past >= 0)``: a real
  native abort, for crash drills. The legacy families have no such check (they would read
  out of bounds), so for them the process aborts itself the way a failed assertion does.
- ``("logits", seq_id, n_past, tokens)`` -> float32 array (n_vocab,): the next-token logits.
- ``("resize", n)`` -> None: create or free instances so that there are ``n``.
- ``("close",)``: free the instances and exit.

The library is not thread-safe (legacy families share one scratch buffer per process), so
this process serves one request at a time on one thread.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.backends.base import SamplerSpec
from runtime.backends.ctransformers.sampling import TokenSampler, greedy_token

__all__ = ["MAX_EVAL_BATCH", "LoadSpec", "WorkerFacts", "main"]

MAX_EVAL_BATCH = 512
"""Tokens one native eval call may carry: the bundled llama.cpp sizes its compute buffer for
``min(n_ctx, 512)`` tokens and aborts on a larger batch (ggml-alloc: not enough space)."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to load: the file, the library's model type, how many instances, their context."""

    path: str
    model_type: str
    instances: int
    context_length: int
    threads: int
    describe: bool = True
    """Also return the vocabulary (pieces, end tokens): needed once, not on a restart."""


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    """What the loaded instances report about the model (token ids, lengths in tokens)."""

    pid: int
    architecture: str
    n_vocab: int
    context_length: int
    eos_token: int
    bos_token: int
    pieces: list[bytes] = field(default_factory=list)
    """Token id -> the bytes the library detokenizes it to (empty unless ``describe``)."""
    eos_tokens: list[int] = field(default_factory=list)
    """Every id the library calls end-of-sequence (``ctransformers_llm_is_eos_token``)."""


def _library_variant() -> str | None:
    """The prebuilt library for this CPU, read from /proc/cpuinfo as ctransformers' own
    choice would be (avx2, else avx with f16c, else basic); None lets ctransformers decide
    (it asks py-cpuinfo, which costs about a second per start)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    if "avx2" in flags:
        return "avx2"
    if "avx" in flags and "f16c" in flags:
        return "avx"
    return "basic"


class Instances:
    """The loaded instances and the samplers of their sequences (sequence i = instance i)."""

    def __init__(self, spec: LoadSpec) -> None:
        from ctransformers.llm import ConfigStruct, load_library

        self.spec = spec
        self.lib: Any = load_library(_library_variant())
        self._config = ConfigStruct(spec.context_length, 0, True, False)
        self.handles: list[int] = []
        self.samplers: dict[int, TokenSampler | None] = {}
        try:
            self.resize(spec.instances)
        except RuntimeError:
            self.close()
            raise
        first = self.handles[0]
        self.n_vocab = int(self.lib.ctransformers_llm_vocab_size(first))
        self.context_length = int(self.lib.ctransformers_llm_context_length(first))
        self.batch = max(1, min(MAX_EVAL_BATCH, self.context_length))

    def resize(self, n: int) -> None:
        """Create instances up to ``n``, or free those from ``n`` on (and their samplers)."""
        spec = self.spec
        while len(self.handles) > n:
            self.lib.ctransformers_llm_delete(self.handles.pop())
            self.samplers.pop(len(self.handles), None)
        while len(self.handles) < n:
            handle = self.lib.ctransformers_llm_create(
                spec.path.encode(), spec.model_type.encode(), self._config
            )
            if not handle:
                raise RuntimeError(
                    f"ctransformers could not create instance {len(self.handles)} of {spec.path!r} "
                    f"(model type {spec.model_type!r}); its loader said only 'Failed to create LLM'"
                )
            self.handles.append(handle)

    def facts(self) -> WorkerFacts:
        """The model's facts; with the vocabulary when the spec asks for it."""
        lib, first = self.lib, self.handles[0]
        pieces: list[bytes] = []
        eos: list[int] = []
        if self.spec.describe:
            pieces = [lib.ctransformers_llm_detokenize(first, t) or b"" for t in range(self.n_vocab)]
            eos = [t for t in range(self.n_vocab) if lib.ctransformers_llm_is_eos_token(first, t)]
        return WorkerFacts(
            pid=os.getpid(),
            architecture=(lib.ctransformers_llm_architecture(first) or b"").decode(errors="replace"),
            n_vocab=self.n_vocab,
            context_length=self.context_length,
            eos_token=int(lib.ctransformers_llm_eos_token_id(first)),
            bos_token=int(lib.ctransformers_llm_bos_token_id(first)),
            pieces=pieces,
            eos_tokens=eos,
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS. The buffer holds one token per UTF-8 byte plus
        room for the space SentencePiece puts in front: no tokenizer here makes more."""
        out: list[list[int]] = []
        for text in texts:
            data = text.encode()
            capacity = len(data) + 8
            buf = (ctypes.c_int * capacity)()
            n = int(self.lib.ctransformers_llm_tokenize(self.handles[0], data, False, buf))
            if n > capacity:  # cannot happen by the bound above; never read past the buffer
                raise RuntimeError(f"the tokenizer returned {n} tokens for {len(data)} bytes")
            out.append(list(buf[:n]))
        return out

    def eval(self, seq_id: int, n_past: int, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Evaluate ``tokens`` on the sequence's instance from position ``n_past``; return a view
        of the last token's logits, shape (n_vocab,), valid until the next eval."""
        handle = self.handles[seq_id]
        array = np.ascontiguousarray(tokens, dtype=np.int32)
        ok = self.lib.ctransformers_llm_batch_eval(
            handle,
            array.ctypes.data_as(ctypes.POINTER(ctypes.c_int)),
            int(array.shape[0]),
            n_past,
            self.batch,
            self.spec.threads,
        )
        if not ok:
            raise RuntimeError(f"the library failed to evaluate {array.shape[0]} tokens at position {n_past}")
        size = int(self.lib.ctransformers_llm_logits_size(handle))
        logits = np.ctypeslib.as_array(self.lib.ctransformers_llm_logits_data(handle), shape=(size,))
        return logits[size - self.n_vocab :]

    def step(
        self,
        samplers: dict[int, SamplerSpec | None],
        evals: Sequence[tuple[int, int, Sequence[int], bool]],
        crash: bool,
    ) -> tuple[list[int], dict[int, str]]:
        """Set samplers, evaluate each sequence, sample those that ask; see the module docstring."""
        for seq_id, spec in samplers.items():
            self.samplers[seq_id] = None if spec is None else TokenSampler(spec)
        if crash and evals:
            if self.spec.model_type != "gguf":
                os.abort()
            seq_id, _, tokens, _ = evals[0]
            self.eval(seq_id, -1, tokens)  # GGML_ASSERT(n_past >= 0) aborts the process
        tokens_out: list[int] = []
        errors: dict[int, str] = {}
        for seq_id, n_past, tokens, sample in evals:
            logits = self.eval(seq_id, n_past, tokens)
            if not sample:
                continue
            index = len(tokens_out)
            sampler = self.samplers.get(seq_id)
            try:
                tokens_out.append(greedy_token(logits) if sampler is None else sampler.sample(logits))
            except Exception as exc:  # one sequence's sampler must not fail the others
                errors[index] = repr(exc)
                tokens_out.append(0)
        return tokens_out, errors

    def close(self) -> None:
        """Free every instance."""
        for handle in self.handles:
            self.lib.ctransformers_llm_delete(handle)
        self.handles.clear()


def serve(conn: Connection) -> None:
    """Answer requests on ``conn`` until ``close`` or until the parent goes away."""
    instances: Instances | None = None
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        command, args = request[0], request[1:]
        if command == "close":
            break
        try:
            if command == "load":
                instances = Instances(args[0])
                reply: object = instances.facts()
            else:
                reply = _answer(instances, command, args)
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("ok", reply))
    if instances is not None:
        instances.close()


def _answer(instances: Instances | None, command: str, args: tuple[Any, ...]) -> object:
    """The reply to one request after ``load``.

    :raises RuntimeError: if nothing is loaded yet or the request is unknown.
    """
    if instances is None:
        raise RuntimeError(f"{command!r} before 'load'")
    if command == "tokenize":
        return instances.tokenize(args[0])
    if command == "step":
        return instances.step(*args)
    if command == "resize":
        instances.resize(args[0])
        return None
    if command == "logits":
        return np.array(instances.eval(*args), dtype=np.float32)
    raise RuntimeError(f"unknown request {command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m runtime.backends.ctransformers.worker FD``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m runtime.backends.ctransformers.worker FD", file=sys.stderr)
        return 2
    conn = Connection(int(args[0]))
    try:
        serve(conn)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so that what it pickles names runtime.backends.ctransformers.worker.
    from runtime.backends.ctransformers.worker import main as _main

    sys.exit(_main())
