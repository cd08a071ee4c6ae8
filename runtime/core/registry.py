"""The model registry: every model a server may load, by name. No request can name a path.

The default model (``RuntimeConfig.model``) is always there, under the name ``default``;
``models_dir`` adds every ``*.gguf`` in that folder under its file stem, and a TOML table
``[models.NAME]`` adds one model or changes one found in the folder::

    [models.coder]
    path = "/models/coder-1.5b.Q4_K_M.gguf"
    slots = "auto"
    n_ctx_per_slot = 4096
    kv_cache_type = "q8_0"
    keep_alive = "10m"
    pinned = false

A name is looked up case-insensitively, with or without Ollama's ``:latest`` tag.
``keep_alive`` follows Ollama: a duration (``"5m"``, ``"1h30m"``, ``"90s"``) or a number of
seconds; 0 unloads the model as soon as it is idle, a negative value keeps it loaded for good.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from runtime.core.config import RuntimeConfig
from runtime.core.durations import parse_keep_alive
from runtime.core.errors import ConfigError, ModelNotFoundError

__all__ = ["DEFAULT_NAME", "ModelRegistry", "ModelSpec"]

DEFAULT_NAME = "default"
"""The registry name of ``RuntimeConfig.model``."""
_TAG = ":latest"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One servable model: its name, its file and the settings it is served with (None: the
    runtime's own setting).

    :ivar keep_alive_s: seconds it stays loaded once idle (``math.inf``: for good; 0: unloaded
        when idle).
    :ivar pinned: loaded at start and never unloaded (neither evicted nor expired).
    """

    name: str
    path: str
    slots: int | Literal["auto"] | None = None
    n_ctx_per_slot: int | None = None
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] | None = None
    keep_alive_s: float | None = None
    pinned: bool = False

    def config(self, base: RuntimeConfig) -> RuntimeConfig:
        """``base`` with this model's file and settings.

        :raises ConfigError: if a setting is out of range.
        """
        changes: dict[str, Any] = {"model": self.path}
        for field in ("slots", "n_ctx_per_slot", "kv_cache_type"):
            if (value := getattr(self, field)) is not None:
                changes[field] = value
        return msgspec.structs.replace(base, **changes)

    def keep_alive(self, base: RuntimeConfig) -> float:
        """Seconds it stays loaded once idle: its own keep_alive, else the runtime's."""
        return parse_keep_alive(base.keep_alive) if self.keep_alive_s is None else self.keep_alive_s


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A ``[models.NAME]`` table as written."""

    path: str | None = None
    slots: int | Literal["auto"] | None = None
    n_ctx_per_slot: int | None = None
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] | None = None
    keep_alive: str | float | None = None
    pinned: bool = False


def _key(name: str) -> str:
    key = name.casefold()
    return key[: -len(_TAG)] if key.endswith(_TAG) else key


class ModelRegistry:
    """The servable models, by name (see the module docstring).

    :param specs: the models besides the default one.
    :param default: the default model's spec (built from ``RuntimeConfig.model`` when None).
    :raises ConfigError: if two models have the same name or a name is not a plain name.
    """

    def __init__(self, specs: Iterable[ModelSpec] = (), default: ModelSpec | None = None) -> None:
        self._specs: dict[str, ModelSpec] = {}
        if default is not None:
            self._specs[DEFAULT_NAME] = default
        for spec in specs:
            if not _NAME.fullmatch(spec.name):
                raise ConfigError(
                    f"model name {spec.name[:40]!r} is not a plain name (letters, digits, '.', '_', '-')"
                )
            if _key(spec.name) in self._specs:
                raise ConfigError(f"model name {spec.name!r} is given twice")
            self._specs[_key(spec.name)] = spec

    @classmethod
    def load(cls, config: RuntimeConfig, tables: Mapping[str, Any] | None = None) -> ModelRegistry:
        """The default model, every GGUF in ``config.models_dir`` and the ``[models.NAME]``
        ``tables`` (a table for a name found in the folder changes its settings).

        :raises ConfigError: if the folder does not exist, a table is malformed or names no
            file, or a file it names does not exist.
        """
        default = ModelSpec(name=DEFAULT_NAME, path=config.model, pinned=True, keep_alive_s=math.inf)
        found: dict[str, str] = {}
        if config.models_dir:
            folder = Path(config.models_dir).expanduser()
            if not folder.is_dir():
                raise ConfigError(f"models_dir {config.models_dir!r} is not a folder")
            for file in sorted(folder.glob("*.gguf")):
                found.setdefault(file.stem, str(file))
        specs = {name: ModelSpec(name=name, path=path) for name, path in found.items()}
        if tables is not None and not isinstance(tables, Mapping):
            raise ConfigError(f"models is {type(tables).__name__}; it must be tables [models.NAME]")
        for name, raw in (tables or {}).items():
            try:
                table = msgspec.convert(raw, _Table, strict=False)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"[models.{name}]: {exc}") from None
            path = table.path or found.get(name)
            if path is None:
                raise ConfigError(f"[models.{name}] gives no path and models_dir holds no {name}.gguf")
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"[models.{name}] path {path!r} is not a file")
            keep = None if table.keep_alive is None else parse_keep_alive(table.keep_alive)
            specs[name] = ModelSpec(
                name=name, path=str(Path(path).expanduser()), slots=table.slots,
                n_ctx_per_slot=table.n_ctx_per_slot, kv_cache_type=table.kv_cache_type,
                keep_alive_s=keep, pinned=table.pinned,
            )  # fmt: skip
        return cls(specs.values(), default=default)

    def get(self, name: str) -> ModelSpec:
        """The model ``name`` names (case-insensitive, ``:latest`` or not).

        :raises ModelNotFoundError: if there is none.
        """
        spec = self._specs.get(_key(name))
        if spec is None:
            raise ModelNotFoundError(name, [f"{n}{_TAG}" for n in self.names()])
        return spec

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._specs

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        """Every model's name, the default first."""
        return [spec.name for spec in self._specs.values()]
