"""Request bodies: read at most ``max_body_bytes``, then decode the JSON into an API's typed
wire struct, so a wrong type is refused with the field's JSON path (``$.options.num_predict``).
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
import numpy as np
from starlette.exceptions import HTTPException
from starlette.requests import Request

from runtime.core.errors import InvalidRequestError

__all__ = ["MAX_JSON_DEPTH", "decode_body", "read_body"]

T = TypeVar("T")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refused early once it is longer than ``max_bytes``.

    :raises HTTPException: 413 if the body (or its Content-Length) is over ``max_bytes``.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    pieces: list[bytes] = []
    size = 0
    async for piece in request.stream():
        size += len(piece)
        if size > max_bytes:
            raise _too_large(size, max_bytes, at_least=True)
        pieces.append(piece)
    return b"".join(pieces)


def _too_large(size: int, limit: int, *, at_least: bool = False) -> HTTPException:
    more = "more than " if at_least else ""
    return HTTPException(
        413, f"request body is {more}{size:,} bytes; the limit is {limit:,} (max_body_bytes)"
    )


MAX_JSON_DEPTH = 64
"""How deep arrays and objects may nest in a body (ours need 4; a JSON schema a dozen or so)."""


def decode_body(body: bytes, kind: type[T]) -> T:
    """Decode ``body`` (a JSON object, UTF-8) into ``kind``.

    :raises InvalidRequestError: if the body is empty, not JSON (NaN and Infinity literals, a
        UTF-16 body, a lone surrogate escape included), nested more than ``MAX_JSON_DEPTH``
        levels anywhere (fields we ignore too), or a field is missing, of the wrong type or out
        of range (the message names the field).
    """
    if not body.strip():
        raise InvalidRequestError("request body is empty; send a JSON object")
    _check_surrogates(body)
    _check_depth(body)
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(str(exc)) from None
    except msgspec.DecodeError as exc:
        hint = "; NaN and Infinity are not JSON numbers" if _NOT_NUMBERS.search(body) else ""
        raise InvalidRequestError(f"request body is not valid JSON (UTF-8): {exc}{hint}") from None
    except RecursionError:  # _check_depth bounds this; kept so that a deep body is never a 500
        raise InvalidRequestError(f"request body nests more than {MAX_JSON_DEPTH} levels") from None


_NOT_NUMBERS = re.compile(rb"[:\[,]\s*-?(?:NaN|Infinity)\b")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD]([89a-fA-F])[0-9a-fA-F]{2}")
"""A JSON escape of a UTF-16 surrogate: valid only as the high half followed by the low half."""


def _escaped(body: bytes, at: int) -> bool:
    """Whether the backslash at ``at`` begins an escape: an even number of backslashes before it
    (each run of them is read once, by the match that follows it: linear in the body)."""
    start = at
    while start > 0 and body[start - 1] == 0x5C:  # a backslash
        start -= 1
    return (at - start) % 2 == 0


def _check_surrogates(body: bytes) -> None:
    """Refuse a lone surrogate escape: it has no UTF-8 form, so no tokenizer can take it."""
    if b"\\u" not in body:
        return
    expect_low_at = -1  # where a high half's low half must begin
    for m in _SURROGATE_ESCAPE.finditer(body):
        if not _escaped(body, m.start()):
            continue  # an escaped backslash, then the text "uD..."
        high = m.group(1) in b"89abAB"
        if expect_low_at >= 0 and (high or m.start() != expect_low_at):
            break  # the high half before this one had no low half
        if not high and expect_low_at != m.start():
            expect_low_at = -2  # a low half with no high half before it
            break
        expect_low_at = m.end() if high else -1
    else:
        if expect_low_at < 0:
            return
    raise InvalidRequestError("request body holds a lone UTF-16 surrogate escape; text must be valid Unicode")


def _check_depth(body: bytes) -> None:
    """Refuse arrays and objects nested deeper than MAX_JSON_DEPTH, counted outside strings, in
    bulk (numpy) and only when the body has that many brackets at all."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return
    raw = np.frombuffer(body, dtype=np.uint8)
    index = np.arange(raw.size)
    backslash = raw == ord("\\")
    last_other = np.maximum.accumulate(np.where(backslash, -1, index))  # last non-backslash at or before
    quote = np.flatnonzero(raw == ord('"'))
    run = quote - 1 - last_other[np.maximum(quote - 1, 0)]  # backslashes just before each quote
    real = quote[(run % 2 == 0) | (quote == 0)]
    toggles = np.zeros(raw.size, dtype=np.int8)
    toggles[real] = 1
    inside = (np.cumsum(toggles) % 2).astype(bool) | (toggles == 1)
    step = np.zeros(raw.size, dtype=np.int32)
    step[(raw == ord("[")) | (raw == ord("{"))] = 1
    step[(raw == ord("]")) | (raw == ord("}"))] = -1
    step[inside] = 0
    depth = int(np.cumsum(step).max(initial=0))
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequestError(
            f"request body nests arrays or objects {depth:,} levels deep; the limit is {MAX_JSON_DEPTH}"
        )
