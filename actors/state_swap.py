"""Save a slot's kept conversation to the host-RAM prompt cache, and restore a cached one.

Called by a slot (actors.slot) before it begins a request, once its prompt is tokenized and the
prefix its own cells share (``keep``) is known. If the cells it is about to overwrite share
little with the prompt, their state is saved (keyed by the conversation's tokens); if a cached
entry shares more of the prompt than ``keep``, its state is restored into the slot's sequence.
Both happen on the step loop's thread between two steps (ModelActor.between_steps); the cache
itself is touched on the event loop only.
"""

from __future__ import annotations

import logging

from actors.host_cache import HostPromptCache
from actors.model import ModelActor
from runtime.backends.base import SequenceStates

__all__ = ["MIN_SAVED_TOKENS", "swap_states"]

log = logging.getLogger("slotserve.host_cache")

MIN_SAVED_TOKENS = 32
"""A conversation shorter than this is not worth a saved state (nor a restore)."""


async def swap_states(
    model: ModelActor, cache: HostPromptCache, seq_id: int, cached: list[int], tokens: list[int], keep: int
) -> int:
    """Save sequence ``seq_id``'s cells (holding ``cached``) if the prompt ``tokens`` keeps
    less than half of them, and restore the cached entry that shares the most of ``tokens`` if
    that is more than ``keep``. Returns the prompt tokens the sequence now holds (the new
    ``keep``: the request evaluates only the rest). A restore that fails returns 0 (the
    request evaluates its whole prompt) and is logged; nothing is raised for it.
    """
    backend = model.backend
    if not isinstance(backend, SequenceStates) or not backend.info.state_export:
        return keep
    save = len(cached) >= MIN_SAVED_TOKENS and keep < len(cached) // 2 and cached not in cache
    best = cache.longest_prefix(tokens)
    use = 0 if best is None else min(best[1], len(tokens) - 1)
    restore = None
    if best is not None and use > keep and use >= MIN_SAVED_TOKENS:
        restore = cache.take(best[0], use - keep)
    else:
        cache.miss()
    if not save and restore is None:
        return keep
    n_cached = len(cached)

    def work() -> tuple[bytes | None, bool]:
        saved = None
        if save and backend.seq_cells(seq_id) >= n_cached:  # cells past it: steps ran ahead
            saved = backend.save_seq(seq_id)
        if restore is None:
            return saved, True
        model.scheduler.forget_trims(seq_id)  # the restored cells replace all of them
        try:
            backend.load_seq(seq_id, restore)
        except RuntimeError as exc:
            log.warning("sequence %d: a cached prompt state could not be restored: %s", seq_id, exc)
            return saved, False
        return saved, True

    saved, restored = await model.between_steps(work)
    if saved is not None:
        cache.put(cached, saved)
    if restore is None:
        return keep
    return use if restored else 0
