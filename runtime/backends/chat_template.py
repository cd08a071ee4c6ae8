"""Rendering a model's chat template (GGUF ``tokenizer.chat_template``) as transformers does,
in one sandboxed renderer for every backend.

The template is Jinja, run in jinja2's immutable sandbox with ``trim_blocks``, ``lstrip_blocks``
and the loop controls, and the variables transformers' ``apply_chat_template`` passes:
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception`` and
``strftime_now``. Whatever the template does wrong (``raise_exception``, an undefined name, a
sandbox violation) is an InvalidRequestError naming the template's message: a 400, never a
crashed slot.

:meth:`ChatTemplate.render_parts` keeps apart what the template wrote (its markers, which are
special tokens) and what the messages said (user content, whose text is never parsed for special
tokens): a user cannot close their turn and open a system one by typing ``<|im_end|>``.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Sequence
from typing import Any, NoReturn

import msgspec

from runtime.core.errors import InvalidRequestError
from runtime.core.messages import ChatMessage

__all__ = ["ChatTemplate", "PromptPart"]


class PromptPart(msgspec.Struct, frozen=True):
    """A piece of a prompt: ``text``, and whether special tokens written in it are parsed
    (True for what the template or the server wrote, False for what a user sent)."""

    text: str
    special: bool


def _raise(message: str) -> NoReturn:
    raise InvalidRequestError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template.

    :raises InvalidRequestError: if the template does not compile (jinja2's message included).
    """

    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the model's chat template does not compile: {exc}") from None
        self._bos, self._eos = bos_token, eos_token
        self.renders_tools = "tools" in source
        """Whether the template reads a ``tools`` variable (it then renders tools and calls itself)."""

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        import jinja2

        extra = {} if tools is None else {"tools": tools}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
                **extra,
            )
        except InvalidRequestError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, LookupError) as exc:  # sandbox errors included
            raise InvalidRequestError(f"the chat template failed on these messages: {exc}") from None

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for ``messages``, ending where the assistant's answer begins.

        :raises InvalidRequestError: if the template raises or fails on these messages.
        """
        return self._render([{"role": m.role, "content": m.content} for m in messages])

    def render_parts(
        self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> list[PromptPart]:
        """The prompt as parts: the template's own text (``special=True``) between the messages'
        contents (``special=False``), in order; their texts joined are :meth:`render`'s.

        The template is rendered once with a placeholder for each content, wrapped in a space on
        either side; a side whose space the template removed (``| trim``) is stripped from the
        content, as the template would have done.

        ``tools`` (OpenAI's ``tools`` objects) are handed to a template that renders them, with
        each message's tool calls, ``tool_call_id`` and ``name``.

        :raises InvalidRequestError: if the template raises or fails on these messages.
        """
        nonce = secrets.token_hex(8)
        holders = [_holder(m, f" \ue000{nonce}{i}\ue001 ") for i, m in enumerate(messages)]
        rendered = self._render(holders, tools)
        parts: list[PromptPart] = []
        last = 0
        for match in re.finditer(f"( ?)\ue000{nonce}(\\d+)\ue001( ?)", rendered):
            if match.start() > last:
                parts.append(PromptPart(rendered[last : match.start()], True))
            content = messages[int(match.group(2))].content
            if not match.group(1):
                content = content.lstrip()
            if not match.group(3):
                content = content.rstrip()
            if content:
                parts.append(PromptPart(content, False))
            last = match.end()
        if last < len(rendered):
            parts.append(PromptPart(rendered[last:], True))
        return parts


def _holder(message: ChatMessage, content: str) -> dict[str, Any]:
    """A message as a template reads it, its content replaced by ``content``."""
    held: dict[str, Any] = {"role": message.role, "content": content}
    if message.tool_calls:
        held["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        held["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        held["name"] = message.name
    return held
