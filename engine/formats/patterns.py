"""The regexes of an `adapter_config.json`, matched in linear time.

An adapter folder is untrusted input, and PEFT reads several of its strings as Python
regexes (`target_modules` and `exclude_modules` as strings, the keys of `rank_pattern`
and `alpha_pattern`, `layers_pattern`). Python's `re` backtracks: a pattern such as
`(a+)+$` runs for hours on a short name and, on a serving thread, stalls every tenant.
These patterns go through RE2 (google-re2) instead, which matches in time linear in the
name. What RE2 cannot express (backreferences, lookaround) and patterns longer than
`MAX_PATTERN_CHARS` are refused with AdapterUnsafePattern ("bad_pattern"): PEFT's own
configs use neither. Torch-free, like the rest of the config parsing.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

from engine.formats.errors import AdapterUnsafePattern

MAX_PATTERN_CHARS = 1024  # PEFT's generated patterns are a few hundred characters
MAX_PATTERN_KEYS = 512  # rank_pattern / alpha_pattern entries (one per module at most)

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern is the caller's error, not a log line


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    return re2.compile(pattern, _OPTIONS)


def compile_pattern(pattern: str, field: str) -> Any:
    """`pattern` compiled by RE2; AdapterUnsafePattern naming `field` if it cannot be."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterUnsafePattern(
            "bad_pattern",
            f"adapter_config.json: {field} is a {len(pattern)}-character pattern; at most "
            f"{MAX_PATTERN_CHARS} are accepted: list the module names instead",
        )
    try:
        return _compiled(pattern)
    except re2.error as exc:
        raise AdapterUnsafePattern(
            "bad_pattern",
            f"adapter_config.json: {field} {pattern!r} is not a pattern this server can "
            f"match safely ({exc}); backreferences and lookaround are not supported: list "
            "the module names instead",
        ) from exc


def fullmatch(pattern: str, name: str, field: str) -> bool:
    return compile_pattern(pattern, field).fullmatch(name) is not None


def match(pattern: str, name: str, field: str) -> Any:
    """Anchored at the start of `name`, like `re.match`; the match or None."""
    return compile_pattern(pattern, field).match(name)
