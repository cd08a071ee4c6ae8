"""Property tests: streaming text is independent of token splits, never leaks a stop string,
and never splits a UTF-8 character (the pure TextStream, then the whole runtime on the fake)."""

from __future__ import annotations

import itertools

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import GenerateRequest, Runtime, RuntimeConfig
from runtime.backends.fake import FakeBackend
from runtime.core.streaming import TextStream

# Printable text with emoji and CJK; no NUL (refused in requests) and no U+FFFD (our marker of a
# split character).
CHARS = st.characters(
    exclude_categories=["Cs"], exclude_characters="\x00\ufffd", min_codepoint=1, max_codepoint=0x1F9FF
)
# A small alphabet makes repeats and overlapping stop strings common.
TEXT = (
    st.text(CHARS, max_size=40)
    | st.text(st.sampled_from("ab é日🎉"), max_size=30)
    | st.sampled_from(["héllo wörld", "日本語のテキスト", "emoji 🎉🚀 ok", "a🎉b"])
)


@st.composite
def stops_for(draw: st.DrawFn, text: str) -> list[str]:
    """Up to 3 stop strings: pieces of ``text`` (so they match, often overlapping) or random."""

    def piece() -> str:
        if text and draw(st.booleans()):
            i = draw(st.integers(0, len(text) - 1))
            return text[i : i + draw(st.integers(1, 4))]
        return draw(st.text(st.sampled_from("ab é日🎉") | CHARS, min_size=1, max_size=4))

    return [piece() for _ in range(draw(st.integers(0, 3)))]


def reference(text: str, stops: list[str]) -> str:
    """The answer as if characters came one at a time: cut at the first stop to complete."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)]
    return text


@st.composite
def split_bytes(draw: st.DrawFn, text: str) -> list[bytes]:
    """``text`` as UTF-8, cut at arbitrary byte offsets (characters may be split)."""
    data = text.encode()
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=len(data))))
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), text=TEXT)
def test_text_stream_matches_reference_for_any_split(data: st.DataObject, text: str) -> None:
    stops = data.draw(stops_for(text))
    pieces = data.draw(split_bytes(text))
    stream = TextStream(tuple(stops))
    emitted = ""
    want = reference(text, stops)
    for piece in pieces:
        out = stream.push(piece)
        assert "\ufffd" not in out  # no character split
        emitted += out
        assert want.startswith(emitted)  # nothing emitted is later taken back (no stop leak)
        if stream.stopped:
            break
    emitted += stream.finish()
    assert emitted == want


def _run_on_fake(pieces: list[bytes], stops: list[str]) -> tuple[list[str], str]:
    script = list(range(257, 257 + len(pieces)))
    backend = FakeBackend(n_seq_max=1, scripts={"go": script}, extra_pieces=pieces)
    request = GenerateRequest(prompt="go", max_tokens=len(pieces) + 1, temperature=0, stop=tuple(stops))

    async def main() -> tuple[list[str], str]:
        async with Runtime(RuntimeConfig(backend="fake", slots=1), backend=backend) as rt:
            chunks = [c.text async for c in rt.generate(request)]
            whole = await rt.complete(request)
        return chunks, whole.text

    return anyio.run(main)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), text=TEXT)
def test_runtime_stream_equals_whole_text_for_any_split(data: st.DataObject, text: str) -> None:
    stops = data.draw(stops_for(text))
    pieces = data.draw(split_bytes(text)) or [b"x"]
    chunks, whole = _run_on_fake(pieces, stops)
    want = reference(b"".join(pieces).decode(), stops)
    assert "".join(chunks) == whole == want
    emitted = ""
    for chunk in chunks:
        assert "\ufffd" not in chunk
        emitted += chunk
        assert want.startswith(emitted)


def test_the_stop_completed_first_wins_whatever_the_split() -> None:
    """ "b" is complete before "abc" is: the answer is "a" whether "abc" comes whole or not."""
    for pieces in ([b"abc"], [b"a", b"bc"], [b"a", b"b", b"c"]):
        stream = TextStream(("abc", "b"))
        out = "".join(stream.push(p) for p in pieces) + stream.finish()
        assert out == "a", pieces
