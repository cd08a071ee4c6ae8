"""RuntimeConfig: every setting, its default, and where it can come from.

Sources, later ones winning: the defaults below, a TOML file, environment variables named
``SLOTSERVE_<FIELD>`` (upper case), keyword arguments.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from runtime.errors import ConfigError

__all__ = ["ENV_PREFIX", "RuntimeConfig"]

ENV_PREFIX = "SLOTSERVE_"
BackendName = Literal["llama_cpp", "fake", "ctransformers"]


class RuntimeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to run one model: which, with how many slots, and how big each slot's context is.

    :raises ConfigError: if a value is out of range (the message names the field and limit).
    """

    model: str = "default"
    """``default`` (the embedded SmolLM2-135M-Instruct) or a path to a local GGUF file."""
    backend: BackendName = "llama_cpp"
    slots: int = 4
    """Concurrent sequences, each a SlotActor with its own part of the KV cache (1 to 1,024)."""
    max_queue: int = 16
    """Admitted requests that may wait for a free slot; more are refused (QueueFullError)."""
    n_ctx_per_slot: int = 2048
    """Tokens of context (prompt + generated) each slot holds."""
    n_batch: int = 512
    """Tokens one step may decode at most: prompt chunks share what decoding slots leave."""
    threads: int = 0
    """CPU threads for decoding; 0 means every core this process may use."""
    n_gpu_layers: int = -1
    """Layers to put on the GPU; -1 means all of them when llama.cpp was built with a GPU."""
    max_tokens_cap: int = 4096
    """Upper bound on one request's max_tokens, and its value when a request leaves it unset."""
    prefix_cache: bool = True
    """Keep a finished prompt's KV cells and reuse the common prefix for the slot's next one."""
    restart_intensity: int = 3
    """Restarts allowed within ``restart_period_s`` before the runtime fails (Erlang/OTP)."""
    restart_period_s: float = 5.0
    stream_buffer: int = 8
    """Chunks a slot may run ahead of a caller who is not reading, before it pauses itself."""

    def __post_init__(self) -> None:
        limits = {
            "slots": (1, 1024),
            "max_queue": (0, 1 << 20),
            "n_ctx_per_slot": (16, 1 << 20),
            "n_batch": (1, 1 << 16),
            "threads": (0, 1024),
            "n_gpu_layers": (-1, 100_000),
            "max_tokens_cap": (1, 1 << 20),
            "restart_intensity": (0, 1_000_000),
            "stream_buffer": (1, 1 << 16),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"{name} is {value}; it must be between {low:,} and {high:,}")
        if not self.restart_period_s > 0:
            raise ConfigError(f"restart_period_s is {self.restart_period_s}; it must be > 0")

    @property
    def n_threads(self) -> int:
        """The CPU thread count to use: ``threads``, or the cores this process may run on."""
        return self.threads or len(os.sched_getaffinity(0))

    @classmethod
    def load(cls, toml_path: str | Path | None = None, **overrides: Any) -> RuntimeConfig:
        """Read defaults < ``toml_path`` < ``SLOTSERVE_*`` environment < ``overrides``.

        :raises ConfigError: if a value is malformed, out of range or an unknown setting.
        """
        values: dict[str, Any] = {}
        if toml_path is not None:
            with open(toml_path, "rb") as f:
                values.update(tomllib.load(f))
        fields = set(cls.__struct_fields__)
        for key, raw in os.environ.items():
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in fields:
                values[key[len(ENV_PREFIX) :].lower()] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(str(exc)) from None
