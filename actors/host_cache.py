"""The host-RAM prompt cache: saved KV states of sequences, keyed by the tokens they hold.

When a slot's kept conversation is about to be overwritten by a request that shares little with
it, the slot saves the sequence's state here (actors.slot); a later prompt that shares a longer
prefix with an entry than with any idle slot's cells has the state restored into its slot and
evaluates only the rest. A pure unit: an LRU over token tuples, bounded in bytes (an entry
bigger than the bound is not kept), the least recently used out first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from actors.placement import common_prefix
from runtime.core.records import HostCacheStatistics

__all__ = ["HostPromptCache"]


class HostPromptCache:
    """Saved sequence states by their tokens, at most ``bound_bytes`` of them (0: none kept)."""

    def __init__(self, bound_bytes: int) -> None:
        if bound_bytes < 0:
            raise ValueError(f"bound_bytes is {bound_bytes}; it must be >= 0")
        self.bound_bytes = bound_bytes
        self.ceiling_bytes = bound_bytes
        """The bound it was made with: a bound that follows memory down may come back up to it."""
        self._entries: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0
        self.evictions = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of the states held now (never above ``bound_bytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._entries

    def set_bound(self, bound_bytes: int) -> None:
        """Hold at most ``bound_bytes`` from now on: the least recently used entries go first."""
        self.bound_bytes = max(0, bound_bytes)
        while self._bytes > self.bound_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def put(self, tokens: Sequence[int], state: bytes) -> bool:
        """Keep ``state`` (the KV state of a sequence holding ``tokens``) as the most recently
        used entry; an entry whose tokens are a prefix of ``tokens`` is dropped (this one serves
        every prompt it did). Returns False (nothing kept) if the state is bigger than the bound
        or ``tokens`` is empty."""
        key = tuple(tokens)
        if not key or len(state) > self.bound_bytes:
            return False
        for old in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(old)
        while self._bytes + len(state) > self.bound_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[key] = state
        self._bytes += len(state)
        return True

    def _drop(self, key: tuple[int, ...]) -> None:
        self._bytes -= len(self._entries.pop(key))

    def longest_prefix(self, prompt: Sequence[int]) -> tuple[tuple[int, ...], int] | None:
        """The entry sharing the longest prefix with ``prompt`` and that prefix's length (the
        most recently used among equals); None when no entry shares a token. Counts nothing."""
        best: tuple[tuple[int, ...], int] | None = None
        for key in reversed(self._entries):
            n = common_prefix(key, prompt)
            if n > 0 and (best is None or n > best[1]):
                best = (key, n)
        return best

    def take(self, key: tuple[int, ...], used_tokens: int) -> bytes:
        """The state of entry ``key``, made the most recently used; counts a hit that saves
        ``used_tokens`` prompt tokens.

        :raises KeyError: if there is no such entry.
        """
        state = self._entries[key]
        self._entries.move_to_end(key)
        self.hits += 1
        self.tokens_saved += used_tokens
        return state

    def miss(self) -> None:
        """Count a prompt that no entry served better than its slot's cells."""
        self.misses += 1

    def statistics(self) -> HostCacheStatistics:
        """A snapshot of the counters and sizes."""
        return HostCacheStatistics(
            bound_bytes=self.bound_bytes,
            held_bytes=self._bytes,
            entries=len(self._entries),
            hits=self.hits,
            misses=self.misses,
            tokens_saved=self.tokens_saved,
            evictions=self.evictions,
        )
