"""The names the models are served under. A request names a model; nothing is ever loaded
from a path: the name must be one of the default model's names below or a registry model's
(runtime.core.registry: ``--models-dir`` and ``[models.NAME]``), or the request gets 404.

The primary name is ``ServerSettings.model_name`` or the GGUF file's name without ``.gguf``
(``SmolLM2-135M-Instruct.Q4_1`` for the embedded model). Also accepted: the file's name,
``default``, ``slotserve`` and the GGUF's ``general.name``; each with or without Ollama's
``:latest`` tag, in any letter case (Ollama's names are case-insensitive). /api/tags lists
each but ``general.name`` as ``name:latest``, the way Ollama lists its models, then every
registry model as ``NAME:latest``. A default-model name wins over a registry model of the same.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from runtime.backends.model_files import resolve_model
from runtime.core.errors import ModelLoadError, RuntimeClosedError
from runtime.core.registry import DEFAULT_NAME
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
        """Accept ``name`` if it names a served model.

        :raises HTTPException: 404 if it names any other model (or a file path).
        """
        self.route(name)

    def route(self, name: str) -> str | None:
        """The registry name ``name`` routes to: None for the default model.

        :raises HTTPException: 404 if it names no served model (or a file path).
        """
        key = name.casefold()
        if key.endswith(_TAG):
            key = key[: -len(_TAG)]
        if key in self.accepted():
            return None
        models = self._runtime.models
        if key in models and key != DEFAULT_NAME:
            return models.get(key).name
        raise model_not_found(name, self.primary)

    def registry_listed(self) -> list[str]:
        """The registry models besides the default, each as ``NAME:latest`` (for /api/tags)."""
        accepted = self.accepted()
        return [
            f"{n}{_TAG}"
            for n in self._runtime.models.names()
            if n != DEFAULT_NAME and n.casefold() not in accepted
        ]
