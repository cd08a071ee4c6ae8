"""Rendering a model's chat template (GGUF ``tokenizer.chat_template``) as transformers does.

The template is Jinja, run in jinja2's immutable sandbox with ``trim_blocks`` and
``lstrip_blocks`` and the variables transformers' ``apply_chat_template`` passes: ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, and ``raise_exception``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from runtime.core.errors import InvalidRequestError
from runtime.core.messages import ChatMessage

__all__ = ["ChatTemplate"]


def _raise(message: str) -> NoReturn:
    raise InvalidRequestError(f"the chat template refused the messages: {message}")


class ChatTemplate:
    """A compiled chat template.

    :raises InvalidRequestError: if the template does not compile (jinja2's message included).
    """

    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the model's chat template does not compile: {exc}") from None
        self._bos, self._eos = bos_token, eos_token

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for ``messages``, ending where the assistant's answer begins.

        :raises InvalidRequestError: if the template raises or fails on these messages.
        """
        import jinja2

        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the chat template failed on these messages: {exc}") from None
