"""From the APIs' JSON bodies to our requests: the pure mapping, and a property: whatever JSON
arrives, decoding and mapping either give a valid request or raise InvalidRequestError (so bad
input can never become a 500)."""

from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import ChatMessage, ChatRequest, GenerateRequest, InvalidRequestError
from runtime.server.body import decode_body
from runtime.server.ollama_wire import (
    OllamaChatBody,
    OllamaGenerateBody,
    chat_request,
    generate_request,
    keep_alive_s,
)
from runtime.server.openai_wire import (
    OpenAIChatBody,
    OpenAICompletionBody,
    choice_count,
    completion_request,
)
from runtime.server.openai_wire import (
    chat_request as openai_chat_request,
)

N_CTX = 512


def ollama_generate(**body: Any) -> GenerateRequest | ChatRequest | None:
    return generate_request(
        decode_body(json.dumps({"model": "m", **body}).encode(), OllamaGenerateBody), N_CTX
    )


def test_ollama_options_map_to_our_fields() -> None:
    options = {"num_predict": 7, "temperature": 0.2, "top_k": 5, "top_p": 0.5, "min_p": 0.1,
               "repeat_penalty": 1.2, "repeat_last_n": 32, "seed": 11, "stop": ["\n"], "num_ctx": 512,
               "num_thread": 8, "num_gpu": 99, "mirostat": 0, "typical_p": 1.0}  # fmt: skip
    got = ollama_generate(prompt="hi", raw=True, options=options)
    assert got == GenerateRequest(
        prompt="hi", max_tokens=7, temperature=0.2, top_k=5, top_p=0.5, min_p=0.1,
        repeat_penalty=1.2, repeat_last_n=32, seed=11, stop=("\n",), parse_special=True, overflow="stop",
    )  # fmt: skip


def test_ollama_num_ctx_is_clamped_and_unknown_options_are_ignored_with_a_notice() -> None:
    notices: list[tuple[str, str]] = []
    body = {"model": "m", "prompt": "hi", "raw": True, "keep_alive": "1h30m",
            "options": {"num_ctx": 32768, "num_predict": 4096, "warp": 9, "top_k": 3}}  # fmt: skip
    decoded = decode_body(json.dumps(body).encode(), OllamaGenerateBody)
    got = generate_request(decoded, N_CTX, lambda key, message: notices.append((key, message)))
    assert got == GenerateRequest(prompt="hi", parse_special=True, max_tokens=4096, top_k=3, overflow="stop")
    assert notices == [
        ("option 'warp'", "options.'warp' is not an Ollama option; ignored (as Ollama does)"),
        (
            "num_ctx 32768",
            "options.num_ctx is 32,768; each slot holds 512 tokens (n_ctx_per_slot), so 512 are used",
        ),
    ]
    huge = ollama_generate(prompt="hi", raw=True, options={"num_predict": 10**9})
    assert huge is not None and huge.max_tokens == 1 << 20  # the request's own bound; it stops at the window


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (300, 300.0), (2.7, 2.0), (-1, math.inf), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5),
     ("0", 0.0), ("-1m", math.inf), ("250ms", 0.25)],
)  # fmt: skip
def test_keep_alive_is_read_as_ollama_reads_it(
    value: str | int | float | None, seconds: float | None
) -> None:
    assert keep_alive_s(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5", "m", "1h-5m", ""])
def test_a_keep_alive_that_is_no_duration_is_refused(value: str) -> None:
    with pytest.raises(InvalidRequestError, match="keep_alive is"):
        ollama_generate(prompt="x", keep_alive=value)


@pytest.mark.parametrize("num_predict", [None, -1, -2])
def test_ollama_unbounded_num_predict_means_until_the_context_is_full(num_predict: int | None) -> None:
    got = ollama_generate(prompt="hi", raw=True, options={"num_predict": num_predict, "seed": -1})
    assert got == GenerateRequest(prompt="hi", parse_special=True, overflow="stop")  # max_tokens None; raw


def test_ollama_generate_uses_the_template_unless_raw() -> None:
    templated = ollama_generate(prompt="hi", system="be brief")
    assert templated == ChatRequest(
        messages=(ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")),
        overflow="stop",
    )
    assert ollama_generate(prompt="") is None  # Ollama's "load the model"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x", "options": {"mirostat": 2}}, "options.mirostat is 2; slotserve supports only 0"),
        (
            {"prompt": "x", "options": {"presence_penalty": 2.5}},
            "presence_penalty is 2.5; it must be -2 to 2",
        ),
        ({"prompt": "x", "logprobs": True, "top_logprobs": 21}, "top_logprobs is 21; it must be 0 to 20"),
        ({"prompt": "x", "options": {"num_predict": 0}}, "options.num_predict is 0"),
        ({"prompt": "x", "options": {"num_ctx": 0}}, "options.num_ctx is 0; it must be >= 1"),
        (
            {"prompt": "x", "options": {"top_k": "many"}},
            "Expected `int | null`, got `str` - at `$.options.top_k`",
        ),
        ({"prompt": "x", "images": ["aGk="]}, "images is ['aGk=']"),
        ({"prompt": "x", "format": "yaml"}, "format is 'yaml'; give \"json\" or a JSON schema"),
        ({"prompt": "x", "format": {"type": "objectx"}}, "the JSON schema does not compile"),
        ({"prompt": "x", "context": [1, 2]}, "context is [1, 2]"),
        ({"prompt": "x", "options": {"temperature": -1}}, "temperature is -1.0"),
    ],
)
def test_ollama_refusals_name_the_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        ollama_generate(**body)


def test_ollama_chat_messages_keep_their_roles() -> None:
    roles = ["system", "user", "assistant", "tool"]
    messages = [{"role": r, "content": r[0]} for r in roles]
    body = decode_body(
        json.dumps({"model": "m", "options": {"top_k": 3}, "messages": messages}).encode(), OllamaChatBody
    )
    got = chat_request(body, N_CTX)
    assert [(m.role, m.content) for m in got.messages] == [("system", "s"), ("user", "u"), ("assistant", "a"),
                                                           ("tool", "t")]  # fmt: skip
    assert got.top_k == 3
    with_images = body.messages[1]
    with_images.images = ["aGk="]
    with pytest.raises(InvalidRequestError, match=r"messages\[1\].images"):
        chat_request(body, N_CTX)


def test_openai_chat_maps_roles_content_parts_and_limits() -> None:
    body = decode_body(
        json.dumps({
            "model": "m", "max_tokens": 50, "max_completion_tokens": 9, "stop": "END", "seed": 4,
            "temperature": 0.5, "top_k": 7, "user": "ignored", "frequency_penalty": 0,
            "messages": [
                {"role": "developer", "content": "d"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
        }).encode(),
        OpenAIChatBody,
    )  # fmt: skip
    got = openai_chat_request(body)
    assert got == ChatRequest(
        messages=(ChatMessage(role="system", content="d"), ChatMessage(role="user", content="a\nb"),
                  ChatMessage(role="assistant", content="")),
        max_tokens=9, stop=("END",), seed=4, temperature=0.5, top_k=7,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"n": 129}, "n is 129; it must be 1 to 128"),
        ({"presence_penalty": -2.1}, "presence_penalty is -2.1; it must be -2 to 2"),
        ({"frequency_penalty": 3}, "frequency_penalty is 3.0; it must be -2 to 2"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs is 21; it must be 0 to 20"),
        ({"top_logprobs": 2}, "top_logprobs is 2; it needs logprobs true"),
        ({"tools": [{"type": "function"}]}, r"tools\[0\] is"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "any"},
            "tool_choice is 'any'",
        ),
        ({"functions": [{"name": "f"}]}, "slotserve supports only tools and tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type is 'xml'"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "json_schema.schema is None",
        ),
        ({"messages": [{"role": "tool", "content": "1"}]}, "tool message without tool_call_id"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            r"messages\[0\].content\[0\].type",
        ),
        ({"messages": []}, "messages is empty"),
    ],
)
def test_openai_chat_refusals_name_the_field(body: dict[str, Any], message: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}]} | body
    with pytest.raises(InvalidRequestError, match=message):
        _map_chat(decode_body(json.dumps(full).encode(), OpenAIChatBody))


def _map_chat(body: OpenAIChatBody) -> tuple[int, ChatRequest]:
    """What the server does with a chat body: its choice count, then its request."""
    return choice_count(body), openai_chat_request(body)


def test_openai_completions_default_to_16_tokens_and_one_prompt() -> None:
    def complete(**body: Any) -> GenerateRequest:
        return completion_request(
            decode_body(json.dumps({"model": "m", **body}).encode(), OpenAICompletionBody)
        )

    assert complete(prompt="x") == GenerateRequest(prompt="x", max_tokens=16)
    assert complete(prompt=["x"], max_tokens=None) == GenerateRequest(prompt="x")
    with pytest.raises(InvalidRequestError, match="one prompt per request"):
        complete(prompt=["x", "y"])
    with pytest.raises(InvalidRequestError, match="echo is True"):
        complete(prompt="x", echo=True)
    assert complete(prompt="x", logprobs=0, presence_penalty=0.5) == GenerateRequest(
        prompt="x", max_tokens=16, logprobs=True, top_logprobs=0, presence_penalty=0.5
    )
    with pytest.raises(InvalidRequestError, match="logprobs is 21; it must be 0 to 20"):
        complete(prompt="x", logprobs=21)
    with pytest.raises(InvalidRequestError, match="Expected `str`, got `int`"):
        complete(prompt=[1, 2, 3])  # token ids are not supported


TEXT = st.text(st.characters(exclude_categories=()), max_size=8)
"""Any code points, lone surrogates included (json.dumps writes them as escapes)."""
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
OPTION_KEYS = ["num_predict", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "num_ctx", "mirostat"]
OLLAMA_BODY = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={
        "prompt": TEXT | JSON,
        "raw": JSON,
        "system": JSON,
        "stream": JSON,
        "options": st.dictionaries(st.sampled_from(OPTION_KEYS), JSON, max_size=4) | JSON,
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "x"]), "content": JSON}), max_size=2
        )
        | JSON,
    },
)
OPENAI_BODY = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.just([{"role": "user", "content": "x"}]) | JSON},
    optional=dict.fromkeys(
        ["prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream_options"], JSON
    ),
)


def _only_invalid_request(call: Any) -> None:
    """``call()`` gives a request whose text is valid Unicode, or raises InvalidRequestError."""
    with contextlib.suppress(InvalidRequestError):  # any other exception fails the property
        request = call()
        if request is not None:
            msgspec.json.encode(request)  # raises UnicodeEncodeError on a lone surrogate


@settings(max_examples=300, deadline=None)
@given(OLLAMA_BODY)
def test_any_ollama_body_maps_or_is_refused_as_invalid(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    _only_invalid_request(lambda: generate_request(decode_body(raw, OllamaGenerateBody), N_CTX))
    _only_invalid_request(lambda: chat_request(decode_body(raw, OllamaChatBody), N_CTX))


@settings(max_examples=300, deadline=None)
@given(OPENAI_BODY)
def test_any_openai_body_maps_or_is_refused_as_invalid(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    _only_invalid_request(lambda: openai_chat_request(decode_body(raw, OpenAIChatBody)))
    _only_invalid_request(lambda: completion_request(decode_body(raw, OpenAICompletionBody)))


@given(st.binary(max_size=64))
def test_any_bytes_decode_or_are_refused_as_invalid(raw: bytes) -> None:
    _only_invalid_request(lambda: decode_body(raw, OllamaGenerateBody))


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


@settings(max_examples=2_000, deadline=None)
@given(
    st.lists(
        st.sampled_from(["\ud800", "\udc00", "\ud83d\ude00", "\\", "\\ud800", "a", '"', "\\\\udc00"]),
        max_size=8,
    )
)
def test_a_lone_surrogate_escape_is_found_exactly(pieces: list[str]) -> None:
    """Whatever mix of surrogates, real pairs, backslashes and look-alike text: the body is
    refused exactly when its text holds a lone surrogate (json.dumps writes them as escapes)."""
    body = json.dumps({"model": "m", "prompt": "".join(pieces)}).encode()
    text = json.loads(body)["prompt"]  # what JSON says: a high escape then a low one is one pair
    if _has_lone_surrogate(text):
        with pytest.raises(InvalidRequestError, match="lone UTF-16 surrogate"):
            decode_body(body, OllamaGenerateBody)
    else:
        assert decode_body(body, OllamaGenerateBody).prompt == text


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


NESTING = st.recursive(
    st.text(st.sampled_from('[]{}"\\ab'), max_size=6) | st.integers(),
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.dictionaries(st.text(st.sampled_from('[{"\\x'), max_size=3), inner, max_size=2)
    ),
    max_leaves=80,
)


@settings(max_examples=500, deadline=None)
@given(NESTING, st.integers(0, 70))
def test_the_depth_limit_counts_brackets_outside_strings_only(value: Any, wrap: int) -> None:
    """Brackets and quotes inside strings (escaped ones too) do not count; the body is refused
    exactly when its arrays and objects nest deeper than MAX_JSON_DEPTH."""
    from runtime.server.body import MAX_JSON_DEPTH

    for _ in range(wrap):
        value = [value]
    body = json.dumps({"model": "m", "prompt": "x", "junk": value}).encode()
    if 1 + _depth(value) > MAX_JSON_DEPTH:
        with pytest.raises(InvalidRequestError, match=f"the limit is {MAX_JSON_DEPTH}"):
            decode_body(body, OllamaGenerateBody)
    else:
        assert decode_body(body, OllamaGenerateBody).prompt == "x"


def test_a_megabyte_of_backslashes_is_scanned_in_linear_time() -> None:
    """The surrogate scan once ran a regex that rescanned each backslash run from every
    position: 32,000 backslashes took seconds. A 1 MB run now takes milliseconds (the bound
    below is a hundred times that: it guards the complexity, not the speed)."""
    import time

    body = b'{"model": "m", "prompt": "\\u0041' + b"\\\\" * 500_000 + b'\\ud800"}'
    start = time.perf_counter()
    with pytest.raises(InvalidRequestError, match="lone UTF-16 surrogate"):
        decode_body(body, OllamaGenerateBody)
    assert time.perf_counter() - start < 1.0
