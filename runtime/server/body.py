"""Request bodies: read at most ``max_body_bytes``, then decode the JSON into an API's typed
wire struct, so a wrong type is refused with the field's JSON path (``$.options.num_predict``).
"""

from __future__ import annotations

import json
import re
from typing import TypeVar

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request

from runtime.core.errors import InvalidRequestError

__all__ = ["decode_body", "read_body"]

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


def decode_body(body: bytes, kind: type[T]) -> T:
    """Decode ``body`` (a JSON object) into ``kind``.

    JSON has no NaN or Infinity, but Python's ``json`` writes them; such a body is decoded
    leniently so that the field holding the value is refused by name, not the whole body.

    :raises InvalidRequestError: if the body is empty or not JSON, or a field is missing, of
        the wrong type or out of range (the message names the field).
    """
    if not body.strip():
        raise InvalidRequestError("request body is empty; send a JSON object")
    try:
        decoded = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(str(exc)) from None
    except msgspec.DecodeError as exc:
        decoded = _decode_leniently(body, kind, InvalidRequestError(f"request body is not valid JSON: {exc}"))
    if _SURROGATE_ESCAPE.search(body):
        _check_unicode(decoded)
    return decoded


def _decode_leniently(body: bytes, kind: type[T], malformed: InvalidRequestError) -> T:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise malformed from None
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(str(exc)) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""A JSON escape of a UTF-16 surrogate: valid only as half of a pair."""


def _check_unicode(decoded: object) -> None:
    """Refuse text holding a lone surrogate: it has no UTF-8 form, so no tokenizer can take it."""
    try:
        msgspec.json.encode(decoded)
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        raise InvalidRequestError(
            f"request body holds a lone UTF-16 surrogate ({bad!r}); text must be valid Unicode"
        ) from None
