"""Exceptions of the adapter layer, one class per way a caller can be refused.

The gRPC servicers translate these by class, never by message, so each class maps to
one status code: AdapterFormatError → INVALID_ARGUMENT / FAILED_PRECONDITION,
AdapterPathError → PERMISSION_DENIED, AdapterNotFoundError → NOT_FOUND,
AdapterConflictError → ALREADY_EXISTS / FAILED_PRECONDITION,
AdapterEvictingError → UNAVAILABLE (retry later), AdapterLoadingError → UNAVAILABLE
once a bounded wait for the load has run out.
"""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """The adapter folder cannot be served on this base model.

    `reason` is a short stable code (e.g. "dora", "shape_mismatch") for metrics and
    tests; the message is a sentence saying what is wrong and what to do about it.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AdapterPathError(PermissionError):
    """The adapter path lies outside every configured adapter root (after resolving
    symlinks and `..`), or does not exist."""


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
