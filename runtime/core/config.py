"""RuntimeConfig: every setting, its default, and where it can come from.

Sources, later ones winning: the defaults below, a TOML file, environment variables named
``SLOTSERVE_<FIELD>`` (upper case), keyword arguments. One TOML file may hold the settings of
every part (the runtime's here, the HTTP server's in runtime.server.settings): each part reads
its own keys from it, and a key that no part knows is refused.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from runtime.core.durations import parse_keep_alive
from runtime.core.errors import ConfigError

__all__ = [
    "ENV_PREFIX", "MAX_GPUS", "RuntimeConfig", "SplitMode", "load_settings", "parse_tensor_split", "parse_weights",
    "read_toml",
]  # fmt: skip

ENV_PREFIX = "SLOTSERVE_"
BackendName = Literal["llama_cpp", "fake", "ctransformers"]
SplitMode = Literal["none", "layer", "row"]
MAX_GPUS = 16
"""llama.cpp's ``llama_max_devices()``: the most GPUs ``tensor_split`` can name."""


class RuntimeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to run one model: which, with how many slots, and how big each slot's context is.

    :raises ConfigError: if a value is out of range (the message names the field and limit).
    """

    model: str = "default"
    """``default`` (the embedded SmolLM2-135M-Instruct) or a path to a local GGUF file."""
    backend: BackendName = "llama_cpp"
    """``llama_cpp`` (GGUF, batched), ``ctransformers`` (legacy GGML families, one instance per
    slot) or ``fake`` (a deterministic test double)."""
    slots: int | Literal["auto"] = 4
    """Concurrent sequences, each a SlotActor with its own part of the KV cache (1 to 1,024),
    or ``auto``: as many as fit in free memory, between min_slots and max_slots."""
    min_slots: int = 1
    """Fewest slots that memory-driven sizing (``auto``, live resizing) may choose."""
    max_slots: int = 16
    """Most slots that memory-driven sizing may choose."""
    unfit_slots: Literal["reduce", "refuse"] = "reduce"
    """A configured slot count that does not fit in memory: ``reduce`` it (with a warning) or
    ``refuse`` to start (ConfigError naming the bytes needed and available)."""
    memory_source: Literal["auto", "host", "nvml", "none"] = "auto"
    """Where free memory is read: ``auto`` is NVML when layers are on a GPU, else the host
    (psutil, bounded by the cgroup v2 limits of this process's own cgroup and those above it);
    ``none`` turns memory-driven sizing off."""
    memory_headroom_fraction: float = 0.10
    """Fraction of the device's memory kept free."""
    memory_headroom_bytes: int = 256 << 20
    """Bytes kept free at least, whatever the fraction gives."""
    resize_interval_s: float = 2.0
    """Seconds between memory readings for live resizing; 0 turns live resizing off."""
    resize_cooldown_s: float = 10.0
    """Seconds after a resize before the next one."""
    resize_hysteresis: float = 0.5
    """Growing needs this many slots' KV bytes to spare beyond the larger count (no flapping)."""
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    """KV cache element type; q8_0 and q4_0 take less memory (more slots) for a little accuracy,
    and turn flash attention on (llama.cpp needs it for a quantized V cache)."""
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
    split_mode: SplitMode = "layer"
    """How llama.cpp spreads the model over several GPUs (its ``split_mode``): ``layer`` (its
    default: whole layers, and their KV cache, on every visible GPU), ``row`` (each matrix's rows
    across the GPUs, the KV cache on ``main_gpu``) or ``none`` (everything on ``main_gpu``)."""
    main_gpu: int = 0
    """The GPU, numbered as CUDA numbers the visible ones (after CUDA_VISIBLE_DEVICES), that
    holds the model with split_mode ``none`` and the KV cache with ``row``."""
    tensor_split: str = ""
    """Each GPU's share of the model, comma-separated in CUDA's order (``3,1``: three quarters on
    the first); a GPU given 0 is not used. Empty: llama.cpp's default, every visible GPU."""
    max_tokens_cap: int | None = None
    """Upper bound on one request's max_tokens, and its value when a request leaves it unset;
    None: the slot's context (n_ctx_per_slot), the most any request can generate."""
    prefix_cache: bool = True
    """Keep a finished conversation's KV cells (prompt and answer) and reuse the common prefix
    for a later request; the idle slot whose cells share the most of a prompt takes it."""
    min_prefix_share: float = 0.1
    """Least part of a prompt an idle slot's cells must share for the prefix to choose that slot
    (llama.cpp's ``--slot-prompt-similarity``); else the least recently used idle slot takes it."""
    host_cache_bytes: int = -1
    """Bytes of host memory the prompt cache (actors.host_cache) may hold: saved KV states of
    conversations a slot gave up, restored for a later prompt that shares their prefix. -1: a
    tenth of the host memory free when the model loads (cgroup limits counted); 0: off."""
    prefill_budget_s: float = 0.05
    """With sequences decoding, a step's prompt tokens are capped so that the step is predicted
    to take at most this many seconds (from measured steps); 0: no cap by time."""
    prefill_budget_tokens: int = 0
    """With sequences decoding, at most this many prompt tokens a step; 0: no cap by count."""
    restart_intensity: int = 3
    """Restarts allowed within ``restart_period_s`` before the runtime fails (Erlang/OTP)."""
    restart_period_s: float = 5.0
    """The window, in seconds, in which ``restart_intensity`` restarts are allowed."""
    restart_backoff_s: float = 0.02
    """First wait before restarting a failed actor; doubles with each recent restart (jittered)."""
    restart_backoff_max_s: float = 2.0
    """Longest wait before a restart, in seconds."""
    stream_buffer: int = 8
    """Chunks a slot may run ahead of a caller who is not reading, before it pauses itself."""
    models_dir: str = ""
    """A folder whose every ``*.gguf`` is served too, under its file stem (runtime.core.registry);
    loaded on its first request. Empty: the default model only (and ``[models.NAME]`` tables)."""
    max_loaded_models: int = 3
    """Models loaded at once at most (Ollama's OLLAMA_MAX_LOADED_MODELS); loading one more first
    unloads the least recently used idle one."""
    keep_alive: str = "5m"
    """How long a model other than the default stays loaded once idle (Ollama's keep_alive: a
    duration, 0 unloads when idle, negative keeps it loaded); a request's keep_alive overrides it."""
    tenant_weights: str = ""
    """Tenants' shares of the slots within a priority class, comma-separated ``name=weight``
    (``batch=1,web=3``); a tenant not named weighs 1 (runtime.core.fair_queue)."""
    tenant_max_queued: int = 0
    """Requests one tenant may have waiting; more are refused (TenantQueueFullError, HTTP 429
    with Retry-After) while others are still admitted. 0: only max_queue bounds them."""
    tenant_max_slots: int = 0
    """Slots one tenant may hold at once; its other requests wait (a request's n choices start
    together, so n above it is refused). 0: no cap."""
    queue_aging_s: float = 30.0
    """Seconds after which a waiting request goes before every other, whatever its priority
    (nothing waits for ever); 0 turns aging off."""
    preemption: bool = True
    """When a request has to wait and every slot is busy, a running request of a lower priority
    (the lowest, the latest started among equals), or else one of a tenant over its weighted
    share of the class's slots while the waiting request's tenant is under its own, is parked:
    its KV state saved to host memory, its slot given to the waiting request; it resumes later
    where it was."""
    metrics_tenants: str = ""
    """Tenants (comma-separated) that get their own ``tenant`` label in the metrics; the rest
    are counted as ``other`` (bounded label sets)."""

    def __post_init__(self) -> None:
        limits = {
            "min_slots": (1, 1024),
            "max_slots": (1, 1024),
            "memory_headroom_bytes": (0, 1 << 50),
            "max_queue": (0, 1 << 20),
            "n_ctx_per_slot": (16, 1 << 20),
            "n_batch": (1, 1 << 16),
            "prefill_budget_tokens": (0, 1 << 16),
            "host_cache_bytes": (-1, 1 << 50),
            "threads": (0, 1024),
            "n_gpu_layers": (-1, 100_000),
            "main_gpu": (0, MAX_GPUS - 1),
            "restart_intensity": (0, 1_000_000),
            "stream_buffer": (1, 1 << 16),
            "max_loaded_models": (1, 1024),
            "tenant_max_queued": (0, 1 << 20),
            "tenant_max_slots": (0, 1024),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"{name} is {value}; it must be between {low:,} and {high:,}")
        if self.max_tokens_cap is not None and not 1 <= self.max_tokens_cap <= 1 << 20:
            raise ConfigError(
                f"max_tokens_cap is {self.max_tokens_cap}; it must be between 1 and 1,048,576, or unset"
            )
        if self.slots != "auto" and not 1 <= self.slots <= 1024:
            raise ConfigError(f"slots is {self.slots}; it must be between 1 and 1,024, or 'auto'")
        if self.min_slots > self.max_slots:
            raise ConfigError(f"min_slots is {self.min_slots}; it must be <= max_slots ({self.max_slots})")
        positive = ("restart_period_s",)
        non_negative = (
            "restart_backoff_s",
            "restart_backoff_max_s",
            "resize_interval_s",
            "resize_cooldown_s",
            "resize_hysteresis",
            "queue_aging_s",
            "min_prefix_share",
            "prefill_budget_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} is {getattr(self, name)}; it must be > 0")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} is {getattr(self, name)}; it must be >= 0")
        parse_tensor_split(self.tensor_split)
        parse_keep_alive(self.keep_alive)
        parse_weights(self.tenant_weights)
        if not 0 <= self.memory_headroom_fraction < 1:
            raise ConfigError(
                f"memory_headroom_fraction is {self.memory_headroom_fraction}; it must be in [0, 1)"
            )

    @property
    def initial_slots(self) -> int:
        """The slot count to start from before memory is read: ``slots``, or min_slots for auto."""
        return self.min_slots if self.slots == "auto" else self.slots

    @property
    def tensor_shares(self) -> tuple[float, ...]:
        """``tensor_split`` as numbers, one per GPU in CUDA's order; () when unset."""
        return parse_tensor_split(self.tensor_split)

    @property
    def weights(self) -> dict[str, float]:
        """``tenant_weights`` as a mapping, tenant -> weight."""
        return parse_weights(self.tenant_weights)

    @property
    def max_tokens_limit(self) -> int:
        """The max_tokens bound in force: ``max_tokens_cap``, or ``n_ctx_per_slot`` when unset."""
        return self.n_ctx_per_slot if self.max_tokens_cap is None else self.max_tokens_cap

    @property
    def n_threads(self) -> int:
        """The CPU thread count to use: ``threads``, or the cores this process may run on."""
        return self.threads or len(os.sched_getaffinity(0))

    @classmethod
    def load(
        cls, toml_path: str | Path | None = None, *, others: Collection[str] = (), **overrides: Any
    ) -> RuntimeConfig:
        """Read defaults < ``toml_path`` < ``SLOTSERVE_*`` environment < ``overrides``.

        :param others: TOML keys that belong to another part's settings (left to it).
        :raises ConfigError: if the file cannot be read, or a value is malformed, out of range
            or an unknown setting.
        """
        table = {k: v for k, v in read_toml(toml_path).items() if k not in others}
        return load_settings(cls, table, overrides)


def parse_tensor_split(text: str) -> tuple[float, ...]:
    """Comma-separated shares (``"3,1"``) as numbers; () for an empty text.

    :raises ConfigError: if they are not numbers >= 0, at least one above 0, for at most
        MAX_GPUS GPUs.
    """
    if not text.strip():
        return ()
    try:
        shares = tuple(float(p) for p in text.split(","))
    except ValueError:
        shares = ()
    valid = all(0 <= s < float("inf") for s in shares) and any(s > 0 for s in shares)
    if not valid or len(shares) > MAX_GPUS:
        raise ConfigError(
            f"tensor_split is {text[:60]!r}; it must be up to {MAX_GPUS} comma-separated numbers >= 0, "
            "at least one of them above 0 (such as '3,1')"
        )
    return shares


def parse_weights(text: str) -> dict[str, float]:
    """``"web=3,batch=1"`` as {"web": 3.0, "batch": 1.0}; {} for an empty text.

    :raises ConfigError: if an item is not ``name=weight`` with a weight > 0 (at most 1,000,000).
    """
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not name.strip() or not 0 < weight <= 1e6:
            raise ConfigError(
                f"tenant_weights has {part[:60]!r}; each item must be name=weight with a weight > 0 and "
                "at most 1,000,000 (such as 'web=3,batch=1')"
            )
        weights[name.strip()] = weight
    return weights


def read_toml(path: str | Path | None) -> dict[str, Any]:
    """The top-level table of the TOML file at ``path`` ({} for None).

    :raises ConfigError: if the file is missing, unreadable or not valid TOML.
    """
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the settings file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the settings file {str(path)!r} is not valid TOML: {exc}") from None


S = TypeVar("S", bound=msgspec.Struct)


def load_settings(cls: type[S], base: dict[str, Any], overrides: dict[str, Any]) -> S:
    """Build ``cls`` from ``base`` < ``SLOTSERVE_<FIELD>`` environment < ``overrides`` (None
    values skipped); strings from the environment are converted to the field types.

    :raises ConfigError: if a value is malformed, out of range or an unknown setting.
    """
    values = dict(base)
    for name in cls.__struct_fields__:
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
