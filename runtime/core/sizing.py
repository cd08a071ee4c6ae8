"""The slot count to start with: what the configuration asks, checked against free memory."""

from __future__ import annotations

import logging

from runtime.core.config import RuntimeConfig
from runtime.core.errors import ConfigError
from runtime.core.nvml import NvmlProbe
from runtime.core.policies import headroom_bytes, slots_that_fit
from runtime.core.records import MemoryReading
from runtime.core.telemetry import CgroupHostProbe, MemoryProbe

__all__ = ["initial_slots", "probe_for"]

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
