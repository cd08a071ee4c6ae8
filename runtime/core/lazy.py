"""Lazy re-exports for a package's ``__init__`` (anyio does this): a name is imported from its
home module when it is first read, so importing one small module does not load the world."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, homes: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that hands on ``homes`` (name -> the module that
    defines it), caching each name in ``namespace`` (the package's ``globals()``) once read.

    The returned function raises AttributeError, as a module does, for a name not in ``homes``.
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value  # later lookups find it without coming here
        return value

    return __getattr__
