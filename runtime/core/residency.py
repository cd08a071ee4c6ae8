"""Which models stay loaded when another must load (pure; the Runtime acts on the plan).

:func:`plan_room` takes the bytes a model needs, the bytes free and the loaded models, and
answers one of three:

- :class:`Fits`: load now, after shrinking these models' idle slots and evicting these idle
  models. Idle slots of others go first (least recently used model first), then idle models,
  least recently used first; a shrink that an eviction made needless is dropped.
- :class:`Wait`: room can be made once models with requests in flight, queued or still
  loading become idle: wait for that, then plan again.
- :class:`NoRoom`: nothing can make room, even with every unpinned model evicted and every
  model at its fewest slots: refuse at once, naming the bytes needed and free.

Never planned: evicting a busy model (requests in flight or queued, or loading) or a pinned
one, or shrinking a model below its busy slots or its ``min_slots``. The cap on loaded models
(``max_loaded_models``) is held the same way: one more model first evicts an idle one.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from runtime.core.records import QueuedRequest, RuntimeState

__all__ = ["Fits", "LoadedModel", "NoRoom", "Resident", "Wait", "plan_room"]


class Resident(msgspec.Struct, frozen=True, kw_only=True):
    """A loaded (or loading) model as placement sees it; sizes in bytes."""

    name: str
    resident_bytes: int
    """Weights plus every slot's KV cache, now."""
    slot_bytes: int
    """What one slot costs (its KV cache and any per-slot instance)."""
    slots: int
    min_slots: int
    busy_slots: int
    """Slots serving a request: a shrink never goes below them."""
    busy: bool
    """Requests in flight or queued, or still loading: never evicted."""
    pinned: bool
    last_used_s: float
    """When it last finished or took a request (monotonic seconds): the LRU order."""

    @property
    def shrinkable_slots(self) -> int:
        """Idle slots it could give up (down to min_slots and its busy slots)."""
        return max(0, self.slots - max(self.min_slots, self.busy_slots))


class LoadedModel(msgspec.Struct, frozen=True, kw_only=True):
    """A model loading or loaded (``rt.loaded_models()``, /api/ps); sizes in bytes."""

    name: str
    state: RuntimeState
    path: str
    size_bytes: int
    """Weights plus every slot's KV cache (0 while loading)."""
    size_vram_bytes: int
    """The same when its layers are on a GPU, else 0 (Ollama's ``size_vram``)."""
    slots: int
    slots_busy: int
    n_ctx_per_slot: int
    pinned: bool
    keep_alive_s: float
    """Seconds it stays loaded once idle (``math.inf``: for good)."""
    expires_at_unix_s: float | None
    """When it unloads if it stays idle (Unix seconds); None: never."""
    queue_depth: int = 0
    """Requests waiting: queued for a slot, or for its load."""
    queue: tuple[QueuedRequest, ...] = ()
    """The first 100 queued for a slot, in the order they would be served (``status().queue``)."""


class Fits(msgspec.Struct, frozen=True, kw_only=True):
    """Load now, after these shrinks (model name -> its new slot count) and evictions."""

    shrinks: dict[str, int] = msgspec.field(default_factory=dict)
    evictions: tuple[str, ...] = ()


class Wait(msgspec.Struct, frozen=True, kw_only=True):
    """Room can be made once busy models are idle."""

    reason: str


class NoRoom(msgspec.Struct, frozen=True, kw_only=True):
    """Nothing can make room: refuse with these figures (bytes)."""

    needed_bytes: int
    free_bytes: int
    reclaimable_bytes: int
    """The most that evicting every unpinned model and shrinking every model could free."""
    reason: str


def plan_room(
    needed_bytes: int, free_bytes: int | None, residents: Sequence[Resident], max_loaded: int
) -> Fits | Wait | NoRoom:
    """The plan that makes room for one more model of ``needed_bytes`` (see the module docstring).

    :param free_bytes: bytes free for models now (after the headroom; negative when less than
        the headroom is free); None: memory is not read, and only ``max_loaded`` binds.
    :param residents: the models loaded or loading now.
    :param max_loaded: models loaded at once at most (the new one included).
    """
    order = sorted(residents, key=lambda r: r.last_used_s)
    unpinned = [r for r in order if not r.pinned]
    idle = [r for r in unpinned if not r.busy]
    must_evict = max(0, len(residents) + 1 - max_loaded)
    known = free_bytes is not None
    free = free_bytes or 0
    reclaimable = sum(r.resident_bytes for r in unpinned) + sum(
        max(0, r.slots - r.min_slots) * r.slot_bytes for r in order if r.pinned
    )
    if must_evict > len(unpinned) or (known and needed_bytes > free + reclaimable):
        why = (
            f"{len(residents)} models are loaded and {len(residents) - len(unpinned)} of them are pinned "
            f"(max_loaded_models={max_loaded})"
            if must_evict > len(unpinned)
            else "not even evicting every unpinned model makes room"
        )
        return NoRoom(needed_bytes=needed_bytes, free_bytes=free, reclaimable_bytes=reclaimable, reason=why)
    if must_evict > len(idle):
        return Wait(reason=f"max_loaded_models={max_loaded} are loaded and none of them is idle")
    evictions = [r.name for r in idle[:must_evict]]
    deficit = needed_bytes - free - sum(r.resident_bytes for r in idle[:must_evict]) if known else 0
    shrinks: dict[str, int] = {}
    freed_by_shrink: dict[str, int] = {}
    for r in order:
        if deficit <= 0:
            break
        if r.name in evictions or r.shrinkable_slots == 0 or r.slot_bytes <= 0:
            continue
        give = min(r.shrinkable_slots, -(-deficit // r.slot_bytes))
        shrinks[r.name] = r.slots - give
        freed_by_shrink[r.name] = give * r.slot_bytes
        deficit -= give * r.slot_bytes
    for r in idle[must_evict:]:
        if deficit <= 0:
            break
        evictions.append(r.name)
        shrinks.pop(r.name, None)
        deficit -= r.resident_bytes - freed_by_shrink.pop(r.name, 0)
    if deficit > 0:
        return Wait(reason=f"{deficit:,} more bytes are held by models with requests in flight or loading")
    for name in reversed(list(shrinks)):  # an eviction may have made a shrink needless
        if deficit + freed_by_shrink[name] <= 0:
            deficit += freed_by_shrink.pop(name)
            del shrinks[name]
    return Fits(shrinks=shrinks, evictions=tuple(evictions))
