"""Which constrained-decoding engine: llama.cpp's grammar sampler, llguidance or xgrammar, side by side.

``python -m runtime.bench.grammar_engines [--out grammar-engines.json] [--tokens 48]`` loads the
embedded SmolLM2 vocabulary (49,152 tokens) and, for each schema of :data:`SCHEMAS`, measures

- compile: from the JSON schema to a ready matcher (llama.cpp: llama-cpp-python's
  ``json_schema_to_gbnf`` and ``llama_sampler_init_grammar``; llguidance: ``LLMatcher``; xgrammar:
  ``GrammarCompiler.compile_json_schema`` where it imports),
- per token, at 1 and 8 constrained rows: walking the tokens of a valid answer, the time to
  restrict one step's rows to what the grammar allows and to advance the grammar by the chosen
  token (llama.cpp: ``llama_sampler_apply`` over every candidate, then ``llama_sampler_accept``;
  llguidance: one ``fill_next_token_bitmask_par`` for all rows, the mask applied to the rows'
  logits in numpy, then ``consume_token``).

It prints the figures and writes them as JSON. The figures are what decided the runtime's engine
(README, "Structured output"). An engine that does not import is reported with the reason.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SCHEMAS", "main", "measure"]

SCHEMAS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (schema, a valid answer whose tokens the grammar walks)
    "flat": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested": (
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "location": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                },
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            },
            "required": ["city", "location", "tags"],
        },
        {"city": "Paris", "location": {"lat": 48.85, "lon": 2.35}, "tags": ["capital", "river"]},
    ),
    "enum_bounds": (
        {
            "type": "object",
            "properties": {
                "color": {"enum": ["red", "green", "blue"]},
                "score": {"type": "integer", "minimum": 0, "maximum": 10},
                "ok": {"type": "boolean"},
            },
            "required": ["color", "score", "ok"],
        },
        {"color": "green", "score": 7, "ok": True},
    ),
}


def _answer_tokens(vocab: Any, answer: dict[str, Any]) -> list[int]:
    import llama_cpp as llama

    data = json.dumps(answer).encode()
    buf = (llama.llama_token * (len(data) + 8))()
    n = llama.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
    return list(buf[:n])


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _llama_cpp(
    vocab: Any, n_vocab: int, rows: int, tokens: list[int], schema: dict[str, Any]
) -> dict[str, float]:
    import llama_cpp as llama
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    def compile_one() -> Any:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
        return llama.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")

    samplers = []
    compile_s = []
    for _ in range(rows):
        smpl, seconds = _timed(compile_one)
        if not smpl:
            raise RuntimeError("llama_sampler_init_grammar returned null")
        samplers.append(smpl)
        compile_s.append(seconds)
    logits = np.random.default_rng(0).standard_normal(n_vocab).astype(np.float32)
    arr = np.zeros(n_vocab, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
    data = llama.llama_token_data_array()
    per_token: list[float] = []
    for token in tokens:
        t0 = time.perf_counter()
        for smpl in samplers:
            arr["id"] = np.arange(n_vocab, dtype=np.int32)
            arr["logit"] = logits
            data.data = arr.ctypes.data_as(ctypes.POINTER(llama.llama_token_data))  # type: ignore[assignment]
            data.size, data.selected, data.sorted = n_vocab, -1, False
            llama.llama_sampler_apply(smpl, ctypes.byref(data))
            if not np.isfinite(arr["logit"][token]):
                raise RuntimeError(f"llama.cpp's grammar refused token {token} of a valid answer")
            llama.llama_sampler_accept(smpl, token)
        per_token.append(time.perf_counter() - t0)
    for smpl in samplers:
        llama.llama_sampler_free(smpl)
    return {"compile_s": statistics.median(compile_s), "token_s": statistics.median(per_token)}


def _llguidance(
    tokenizer: Any, n_vocab: int, rows: int, tokens: list[int], schema: dict[str, Any]
) -> dict[str, float]:
    import llguidance
    import llguidance.numpy as lln

    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    matchers = []
    compile_s = []
    for _ in range(rows):
        m, seconds = _timed(lambda: llguidance.LLMatcher(tokenizer, grammar))
        if m.is_error():
            raise RuntimeError(m.get_error())
        matchers.append(m)
        compile_s.append(seconds)
    executor = llguidance.LLExecutor()
    mask = lln.allocate_token_bitmask(rows, n_vocab)
    logits = np.random.default_rng(0).standard_normal((rows, n_vocab)).astype(np.float32)
    per_token: list[float] = []
    for token in tokens:
        t0 = time.perf_counter()
        lln.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
        allowed = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :n_vocab].view(bool)
        masked = np.where(allowed, logits, -np.inf)
        if not np.isfinite(masked[:, token]).all():
            raise RuntimeError(f"llguidance refused token {token} of a valid answer")
        for m in matchers:
            m.consume_token(token)
        per_token.append(time.perf_counter() - t0)
    return {"compile_s": statistics.median(compile_s), "token_s": statistics.median(per_token)}


def _xgrammar_status() -> str:
    try:
        import xgrammar  # noqa: F401
    except Exception as exc:  # xgrammar 0.2.9: its matcher and tvm_ffi import torch at the top
        return (
            f"does not import: {exc!r} (xgrammar 0.2.9 requires torch, transformers and triton; "
            "with those stubbed, tvm_ffi's argument conversion still calls into torch)"
        )
    return "imports, not measured here"


def measure(n_tokens: int = 48) -> dict[str, Any]:
    """Every engine on every schema at 1 and 8 rows; seconds (blocking: it loads the vocabulary).

    :returns: ``{"vocab": n, "engines": {engine: {schema: {rows: {compile_s, token_s}}}}, "notes": {}}``
    """
    import llama_cpp as llama

    from runtime.backends.llama_cpp import init_llama
    from runtime.backends.model_files import resolve_model

    init_llama()
    params = llama.llama_model_default_params()
    params.vocab_only = True
    model = llama.llama_model_load_from_file(str(resolve_model("default")).encode(), params)
    vocab = llama.llama_model_get_vocab(model)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    out: dict[str, Any] = {"vocab": n_vocab, "engines": {}, "notes": {}}
    engines: dict[str, Callable[[int, list[int], dict[str, Any]], dict[str, float]]] = {
        "llama.cpp grammar": lambda rows, toks, schema: _llama_cpp(vocab, n_vocab, rows, toks, schema)
    }
    try:
        from llguidance.llamacpp import lltokenizer_from_vocab

        tokenizer, seconds = _timed(lambda: lltokenizer_from_vocab(vocab))
        out["notes"]["llguidance"] = f"tokenizer built once in {seconds:.2f} s"
        engines["llguidance"] = lambda rows, toks, schema: _llguidance(tokenizer, n_vocab, rows, toks, schema)
    except ImportError as exc:
        out["notes"]["llguidance"] = f"does not import: {exc!r}"
    out["notes"]["xgrammar"] = _xgrammar_status()
    for engine, run in engines.items():
        figures: dict[str, Any] = {}
        for name, (schema, answer) in SCHEMAS.items():
            toks = _answer_tokens(vocab, answer)[:n_tokens]
            figures[name] = {str(rows): run(rows, toks, schema) for rows in (1, 8)}
        out["engines"][engine] = figures
    llama.llama_model_free(model)
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure, print a table, write ``--out`` (JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("grammar-engines.json"))
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args(argv)
    result = measure(args.tokens)
    print(f"vocabulary {result['vocab']:,} tokens")
    print(f"{'engine':<18} {'schema':<12} {'compile ms':>10} {'1 row us/tok':>13} {'8 rows us/tok':>14}")
    for engine, figures in result["engines"].items():
        for name, by_rows in figures.items():
            print(
                f"{engine:<18} {name:<12} {by_rows['1']['compile_s'] * 1e3:>10.2f} "
                f"{by_rows['1']['token_s'] * 1e6:>13.0f} {by_rows['8']['token_s'] * 1e6:>14.0f}"
            )
    for engine, note in result["notes"].items():
        print(f"{engine}: {note}")
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
