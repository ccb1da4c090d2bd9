"""Stop strings: end generation before the first occurrence, never leaking any of it.

A stop string may span several tokens (and several text deltas), so the matcher holds
back the longest tail of the text that could still grow into a stop string and only
emits text that can no longer be part of one.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


def validate_stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    """Return `stop` as a tuple without duplicates (first occurrence order kept).

    Raises ValueError with a sentence for the caller if there are more than
    MAX_STOP_STRINGS, or one is empty or longer than MAX_STOP_STRING_CHARS.
    """
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(
            f"{len(stop)} stop strings were given; at most {MAX_STOP_STRINGS} are allowed"
        )
    for index, text in enumerate(stop):
        if not isinstance(text, str):
            raise ValueError(f"stop string {index} is not a string")
        if not text:
            raise ValueError(f"stop string {index} is empty; remove it or give it some text")
        if len(text) > MAX_STOP_STRING_CHARS:
            raise ValueError(
                f"stop string {index} has {len(text)} characters; "
                f"at most {MAX_STOP_STRING_CHARS} are allowed"
            )
    return tuple(dict.fromkeys(stop))


class StopMatcher:
    """Filter one request's text deltas through its stop strings.

    Contract: the concatenation of everything `push` and `flush` return is the generated
    text up to (excluding) the earliest occurrence of any stop string, or all of it if
    none occurs. Stop strings must be non-empty (see `validate_stop_strings`).
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must not be empty")
        self._stop_strings = tuple(stop_strings)
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed the next text delta; return `(text_to_emit, stopped)`.

        Once stopped, the request must end: later calls return `("", True)`.
        """
        if self.stopped:
            return "", True
        if not self._stop_strings:
            return delta, False
        text = self._held + delta
        match = self._earliest_match(text)
        if match >= 0:
            self.stopped = True
            self._held = ""
            return text[:match], True
        keep = self._longest_partial_suffix(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """At the end of a generation that did not stop: the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _earliest_match(self, text: str) -> int:
        positions = [p for p in (text.find(s) for s in self._stop_strings) if p >= 0]
        return min(positions, default=-1)

    def _longest_partial_suffix(self, text: str) -> int:
        # Length of the longest tail of `text` that is a proper prefix of a stop string;
        # that tail may still become a match, everything before it never can.
        best = 0
        for stop in self._stop_strings:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
