"""Stop strings, matched on streamed text without ever emitting part of a match.

Text arrives in arbitrary pieces, so a stop string may span pieces. We hold back the longest
tail of the text seen so far that is a proper prefix of some stop string (at most the longest
stop string minus one character) until the next piece shows whether it completes a match.

Which match wins: the one that is completed first in the text (smallest end position); among
matches ending at the same character, the longest (it starts earliest). That is exactly what a
character-by-character stream would see, so the result never depends on how text is split.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Filters one stream's text: what is safe to emit, and the stop string once one matches."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool) -> None:
        self._stops = [s for s in dict.fromkeys(stop) if s]
        self._include = include_stop_str_in_output
        self._max_holdback = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self.matched_stop: str | None = None

    @property
    def held_back(self) -> str:
        """Text received but not emitted yet (a possible start of a stop string)."""
        return self._held

    def feed(self, new_text: str, final: bool) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string that matched or None).

        A match truncates the text before the stop string (after it with
        include_stop_str_in_output) and is reported once; after it nothing more is emitted.
        With final=True everything held back is released.
        """
        if self.matched_stop is not None:
            return "", None
        if not self._stops:
            return new_text, None
        text = self._held + new_text
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self.matched_stop = stop
            self._held = ""
            return text[: start + len(stop) if self._include else start], stop
        keep = 0 if final else self._partial_match_length(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the match that ends first, the longest on a tie."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        end, neg_length, stop = best
        return end + neg_length, stop

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest tail of `text` that some stop string starts with."""
        for length in range(min(self._max_holdback, len(text)), 0, -1):
            tail = text[len(text) - length :]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
