"""A request's prompt as tokens, with bounded work whatever the request holds.

- Before any rendering or tokenizing, a prompt whose text cannot fit the slot is refused: a text
  of B bytes is at least B / ``max_token_bytes`` tokens, and a chat message costs a token at
  least.
- Special tokens are read only in text the template wrote (its markers): a chat message's
  content is plain text, whatever it spells, so a user cannot close their turn and open a system
  one. A raw prompt is read for them only when it asks (``parse_special``: its caller wrote the
  whole template).
- The text is cut at each special token that is read, as llama.cpp cuts it itself: the special
  token is its id, the plain text between two of them one tokenizer call (llama.cpp's own
  special-token pass costs the square of their number: 20,000 in one call take 0.9 s).
- Between two pieces a cancel takes effect, and tokenizing stops as soon as the tokens so far
  cannot fit the slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from runtime.backends.base import Backend
from runtime.backends.chat_template import PromptPart
from runtime.core.errors import ContextOverflowError, InvalidRequestError
from runtime.core.messages import ChatRequest, GenerateRequest
from runtime.core.tool_prompt import messages_with_tools, template_tools, uses_tools

__all__ = [
    "INLINE_PROMPT_CHARS",
    "PromptCancelled",
    "check_prompt_size",
    "prompt_chars",
    "prompt_parts",
    "tokenize_parts",
]


class PromptCancelled(Exception):
    """The request was cancelled while its prompt was being tokenized."""


def check_prompt_size(request: GenerateRequest | ChatRequest, n_ctx: int, max_token_bytes: int) -> None:
    """Refuse a prompt whose text is too long for ``n_ctx`` tokens, before rendering or
    tokenizing it (cheap: a length per message).

    :raises ContextOverflowError: with a lower bound of the prompt's tokens.
    """
    if isinstance(request, ChatRequest):
        n_messages = len(request.messages)
        if n_messages >= n_ctx:
            raise ContextOverflowError(
                n_messages, 0, n_ctx, at_least=f"{n_messages:,} messages, a token each"
            )
        size = sum(len(m.content.encode()) for m in request.messages)
    else:
        size = len(request.prompt.encode())
    bound = -(-size // max(1, max_token_bytes))
    if bound >= n_ctx:
        why = f"{size:,} bytes of text; no token of this model stands for more than {max_token_bytes} bytes"
        raise ContextOverflowError(bound, 0, n_ctx, at_least=why)


INLINE_PROMPT_CHARS = 2048
"""A prompt of at most this much text is tokenized on the event loop: its template and tokenizer
take 30 to 300 us, less than a thread hop (60 to 90 us, and one of anyio's 40 threads)."""


def prompt_chars(request: GenerateRequest | ChatRequest) -> int:
    """Characters of text in the request's prompt (the template's own not counted)."""
    if isinstance(request, ChatRequest):
        return sum(len(m.content) for m in request.messages)
    return len(request.prompt)


def prompt_parts(backend: Backend, request: GenerateRequest | ChatRequest) -> list[PromptPart]:
    """The request's prompt as parts (blocking: the template renders here).

    :raises InvalidRequestError: if the model has no chat template, or the template fails.
    """
    if isinstance(request, GenerateRequest):
        return [PromptPart(request.prompt, request.parse_special)]
    template = backend.chat_template
    if template is None:
        raise InvalidRequestError(f"model {backend.info.name!r} has no chat template; send a raw prompt")
    if not uses_tools(request):
        return template.render_parts(request.messages)
    if template.renders_tools:
        return template.render_parts(request.messages, template_tools(request))
    return template.render_parts(messages_with_tools(request))


def _pieces(parts: list[PromptPart], backend: Backend) -> Iterator[str | int]:
    """Plain text runs (str) and the special tokens read between them (their ids)."""
    pattern, ids = backend.special_pattern, backend.special_tokens
    plain: list[str] = []
    for part in parts:
        if not part.special or pattern is None:
            plain.append(part.text)
            continue
        last = 0
        for match in pattern.finditer(part.text):
            plain.append(part.text[last : match.start()])
            if text := "".join(plain):
                yield text
            plain = []
            yield ids[match.group()]
            last = match.end()
        plain.append(part.text[last:])
    if text := "".join(plain):
        yield text


def tokenize_parts(
    backend: Backend, parts: list[PromptPart], n_ctx: int, cancelled: Callable[[], bool]
) -> list[int]:
    """The tokens of ``parts`` (blocking), BOS first if the model wants one.

    :raises PromptCancelled: if ``cancelled()`` turned true between two pieces.
    :raises ContextOverflowError: as soon as the tokens cannot fit ``n_ctx`` (a lower bound).
    :raises InvalidRequestError: if the prompt has no tokens at all.
    """
    tokens = backend.tokenize("", add_special=True, parse_special=False)  # BOS, if the model wants one
    bos = len(tokens)
    for piece in _pieces(parts, backend):
        if cancelled():
            raise PromptCancelled
        if isinstance(piece, int):
            tokens.append(piece)
        else:
            tokens += backend.tokenize(piece, add_special=False, parse_special=False)
        if len(tokens) >= n_ctx:
            raise ContextOverflowError(
                len(tokens), 0, n_ctx, at_least="counted before the rest was tokenized"
            )
    if len(tokens) == bos:
        raise InvalidRequestError("prompt has no tokens after tokenizing; it needs at least one")
    return tokens
