"""The names the one model is served under. A request names a model; nothing is ever loaded
from that name: it must be one of these, or the request gets 404.

The primary name is ``ServerSettings.model_name`` or the GGUF file's name without ``.gguf``
(``SmolLM2-135M-Instruct.Q4_1`` for the embedded model). Also accepted: the file's name,
``default``, ``slotserve`` and the GGUF's ``general.name``; each with or without Ollama's
``:latest`` tag, in any letter case (Ollama's names are case-insensitive). /api/tags lists
each but ``general.name`` as ``name:latest``, the way Ollama lists its models.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from runtime.backends.model_files import resolve_model
from runtime.core.errors import ModelLoadError, RuntimeClosedError
from runtime.server.errors import model_not_found
from runtime.server.served import ServedRuntime

__all__ = ["ModelNames"]

ALIASES = ("default", "slotserve")
_TAG = ":latest"


def _stem(path: str) -> str:
    name = Path(path).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


class ModelNames:
    """Which model names ``runtime`` answers to (see the module docstring)."""

    def __init__(self, runtime: ServedRuntime, model_name: str | None = None) -> None:
        self._runtime = runtime
        self._model_name = model_name
        config = runtime.config
        if config.backend == "fake":
            self._configured = "fake"
        else:
            try:
                self._configured = _stem(str(resolve_model(config.model)))
            except ModelLoadError:
                self._configured = _stem(config.model)

    @property
    def primary(self) -> str:
        """The name listed by /api/tags and /v1/models."""
        if self._model_name is not None:
            return self._model_name
        try:
            return _stem(self._runtime.backend.info.path)
        except RuntimeClosedError:  # not loaded yet: the configured file's name
            return self._configured

    def listed(self) -> list[str]:
        """The names /api/tags lists, each with Ollama's ``:latest`` tag: the primary name, the
        file's name and the aliases (``general.name`` is accepted but not listed: it is a title,
        often with spaces, not a name)."""
        names: dict[str, str] = {}
        for name in (self.primary, self._configured, *ALIASES):
            names.setdefault(name.casefold(), name)
        return [f"{n}{_TAG}" for n in names.values()]

    def accepted(self) -> frozenset[str]:
        """Every accepted name, case-folded, without a tag."""
        names = {self.primary, self._configured, *ALIASES}
        with contextlib.suppress(RuntimeClosedError):  # general.name is known once loaded
            names.add(self._runtime.backend.info.name)
        return frozenset(n.casefold() for n in names)

    def check(self, name: str) -> None:
        """Accept ``name`` if it names the served model.

        :raises HTTPException: 404 if it names any other model (or a file path).
        """
        key = name.casefold()
        if key.endswith(_TAG):
            key = key[: -len(_TAG)]
        if key not in self.accepted():
            raise model_not_found(name, self.primary)
