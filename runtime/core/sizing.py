"""The slot count and the prompt cache's bound to start with: what the configuration asks,
checked against free memory."""

from __future__ import annotations

import logging

import msgspec

from runtime.core.config import RuntimeConfig
from runtime.core.errors import ConfigError
from runtime.core.nvml import NvmlProbe
from runtime.core.policies import headroom_bytes, slots_that_fit
from runtime.core.records import MemoryReading
from runtime.core.telemetry import CgroupHostProbe, MemoryProbe

__all__ = [
    "HOST_CACHE_FREE_SHARE",
    "host_cache_bound",
    "host_cache_rebound",
    "host_cache_reserve",
    "initial_slots",
    "probe_for",
    "start_sizes",
]

log = logging.getLogger("slotserve.sizing")


def probe_for(config: RuntimeConfig, gpu_layers: int) -> MemoryProbe | None:
    """The memory probe ``config.memory_source`` names (``auto``: NVML, of the GPUs that hold
    the model, when layers are on a GPU; else the host); None for ``none``."""
    source = config.memory_source
    if source == "none":
        return None
    if source == "nvml" or (source == "auto" and gpu_layers > 0):
        return NvmlProbe.for_config(config)
    return CgroupHostProbe()


HOST_CACHE_FREE_SHARE = 0.1
"""Of the host memory free when a model loads, the part its prompt cache may hold by default."""


def host_cache_bound(
    config: RuntimeConfig, reading: MemoryReading | None, host: MemoryProbe | None, slots_bytes: int = 0
) -> int:
    """Bytes the host-RAM prompt cache may hold: ``host_cache_bytes``, or for -1 a tenth of the
    free host memory (cgroup limits counted) that the slots leave: ``reading`` less
    ``slots_bytes`` (what the starting slots take of it beyond the context there now, and the
    headroom) where it is the host's, else what ``host`` reads (the model's KV is on a GPU); 0
    (off) when it cannot be read. The slots come first; the cache takes a part of the rest."""
    if config.host_cache_bytes >= 0:
        return config.host_cache_bytes
    if reading is None or reading.source == "nvml":
        reading, slots_bytes = (None if host is None else host.read()), 0
    if reading is None or reading.free_bytes is None or reading.source == "nvml":
        return 0
    return int(max(0, reading.free_bytes - slots_bytes) * HOST_CACHE_FREE_SHARE)


def host_cache_rebound(
    config: RuntimeConfig, reading: MemoryReading, ceiling_bytes: int, held_bytes: int
) -> int:
    """The prompt cache's bound after a new reading: with ``host_cache_bytes`` -1 and a reading
    of host memory, a tenth of what is free for it (the free bytes and those it holds), never
    above ``ceiling_bytes`` (the bound it started with); otherwise ``ceiling_bytes``. A tighter
    limit (a cgroup's memory.max lowered) lowers it, and the cache drops its least recently used
    entries; a looser one raises it again, up to the ceiling."""
    if config.host_cache_bytes >= 0 or reading.source == "nvml" or reading.free_bytes is None:
        return ceiling_bytes
    return min(ceiling_bytes, int((reading.free_bytes + held_bytes) * HOST_CACHE_FREE_SHARE))


def host_cache_reserve(reading: MemoryReading, bound_bytes: int, held_bytes: int) -> int:
    """Of ``reading``'s free bytes, those the prompt cache may still take and the slots must not
    grow into: its bound less what it holds (already used in the reading), where the reading is
    of host memory; 0 for a GPU's."""
    return 0 if reading.source == "nvml" else max(0, bound_bytes - held_bytes)


def initial_slots(
    config: RuntimeConfig, reading: MemoryReading | None, slots_now: int, kv_bytes_per_slot: int
) -> int:
    """How many slots to start with.

    ``auto`` takes what fits in ``reading`` (clamped to min_slots..max_slots); a number that
    does not fit is reduced with a warning or refused, as ``unfit_slots`` says. With no reading,
    or one whose bounding device is unknown, the configured number stands (``auto``: min_slots).

    :param slots_now: sequences of the context that exists now (its KV is reclaimable).
    :raises ConfigError: if the configured number does not fit and ``unfit_slots`` is refuse,
        or not even one slot fits; the message names the bytes needed and available.
    """
    wanted = config.initial_slots
    if reading is None or reading.free_bytes is None or reading.total_bytes is None:
        return wanted
    free = reading.free_bytes
    headroom = headroom_bytes(
        reading.total_bytes, config.memory_headroom_fraction, config.memory_headroom_bytes
    )
    fit = slots_that_fit(free, slots_now, kv_bytes_per_slot, headroom)
    if config.slots == "auto":
        return min(config.max_slots, max(config.min_slots, fit))
    if fit >= wanted:
        return wanted
    available = free + slots_now * kv_bytes_per_slot
    message = (
        f"{wanted} slots need {wanted * kv_bytes_per_slot:,} bytes of KV cache plus {headroom:,} bytes of "
        f"headroom; {available:,} bytes are available ({reading.source}, {reading.device})"
    )
    if config.unfit_slots == "refuse" or fit < 1:
        raise ConfigError(message + f"; set slots <= {fit} or unfit_slots='reduce'")
    log.warning("%s: reducing slots from %d to %d", message, wanted, fit)
    return fit


def start_sizes(
    config: RuntimeConfig,
    reading: MemoryReading | None,
    probe: MemoryProbe | None,
    slots_now: int,
    slot_bytes: int,
) -> tuple[int, int]:
    """The slots a model starts with and its prompt cache's bound in bytes, from ``reading``
    (None: memory is not read) by ``probe``, with ``slots_now`` sequences built already and
    ``slot_bytes`` a slot's whole cost. A set ``host_cache_bytes`` is kept from the slots; the
    automatic bound takes a part of what they leave.

    :raises ConfigError: as :func:`initial_slots`.
    """
    sized = reading
    if (
        reading is not None
        and reading.free_bytes is not None
        and config.prefix_cache
        and config.host_cache_bytes > 0
    ):
        free = reading.free_bytes - host_cache_reserve(reading, config.host_cache_bytes, 0)
        sized = msgspec.structs.replace(reading, free_bytes=free)
    slots = initial_slots(config, sized, slots_now, slot_bytes)
    if not config.prefix_cache:
        return slots, 0
    taken = (slots - slots_now) * slot_bytes
    if reading is not None and reading.total_bytes is not None:
        taken += headroom_bytes(
            reading.total_bytes, config.memory_headroom_fraction, config.memory_headroom_bytes
        )
    # The host cache reads host memory: the model's probe unless it reads GPUs (then the host's own).
    host = CgroupHostProbe() if isinstance(probe, NvmlProbe) else probe
    return slots, host_cache_bound(config, reading, host, taken)
