"""Exceptions of the adapter registry, one class per way a caller can be refused.

The gRPC servicers translate these by class, never by message, so each class maps to
one status code: AdapterNotFoundError → NOT_FOUND, AdapterConflictError →
FAILED_PRECONDITION, AdapterEvictingError → UNAVAILABLE (retry later),
AdapterLoadingError → UNAVAILABLE once a bounded wait for the load has run out. What is
wrong with an adapter folder itself is an `engine.formats.errors.AdapterFormatError`.
"""

from __future__ import annotations


class AdapterNotFoundError(KeyError):
    """No loaded adapter has this id or alias."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterConflictError(ValueError):
    """The id or an alias is already taken by different content or another adapter."""


class AdapterEvictingError(RuntimeError):
    """The adapter is being evicted: it finishes requests in flight but takes no new ones."""


class AdapterLoadingError(RuntimeError):
    """The adapter is announced (being preloaded) but not loaded yet: wait or retry."""
