"""Turning generated token bytes into streamable text: pure, so hypothesis can test it.

Two steps per token, both incremental:

1. UTF-8: a token's bytes may end inside a multi-byte character; the stdlib's incremental
   decoder keeps the partial character until its last byte arrives.
2. Stop strings: text that could be the start of a stop string is held back until the next
   text decides it; a matched stop string and everything after it are never emitted
   (llama.cpp's server and Ollama behave the same way). The first stop string to be complete
   wins, so the answer is the same however the text is split into tokens.
"""

from __future__ import annotations

import codecs

__all__ = ["StopMatcher", "TextStream"]


class StopMatcher:
    """Holds back text that may begin a stop string; finds the first stop string.

    ``push`` returns the text that is safe to emit now; after a match ``stopped`` is True and
    everything from the stop string on is dropped.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add ``text``; return the part of the text so far that can no longer be in a stop."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        # The stop that is complete first wins (earliest end, then earliest start), as if the
        # text had come one character at a time: the result never depends on token splits.
        hits = [(i + len(s), i) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)[1]]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Release held-back text at the end of generation (no more text can complete it)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Token bytes in, emit-ready text out: UTF-8 reassembly, then stop-string holdback."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        """True once a stop string was generated."""
        return self._stop.stopped

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that may be emitted now."""
        return self._stop.push(self._utf8.decode(piece))

    def finish(self) -> str:
        """End of generation: flush a dangling partial character (as U+FFFD) and held text."""
        return self._stop.push(self._utf8.decode(b"", final=True)) + self._stop.flush()
