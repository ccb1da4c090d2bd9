"""Typed errors: one exception class per gRPC status a caller can act on.

Every error the SDK raises for a refused or failed call is a `LoraplexError`; its
`code` is the gRPC status and its `message` the server's sentence (what to fix). Catch
the subclass you can handle (`NotFoundError`, `UnavailableError`, ...) and the base
class for the rest. Mistakes caught on the client side before any call is made (two
prompts, an unknown option) are plain `ValueError` / `TypeError`.
"""

from __future__ import annotations

import grpc


class LoraplexError(Exception):
    """A call refused or failed. `code` is the gRPC status, `message` the sentence."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(LoraplexError):
    """The request is malformed (a bad option, an empty prompt, a name that cannot be)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(LoraplexError):
    """The adapter, tenant, key, base model or engine named does not exist (for you)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(LoraplexError):
    """Something of that name exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(LoraplexError):
    """The request is well formed but cannot apply now: an incompatible or retired
    adapter, a disabled tenant."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDeniedError(LoraplexError):
    """The credentials are valid but do not cover this (another tenant's adapter)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(LoraplexError):
    """No credentials, or an unknown, revoked or malformed key or admin token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhaustedError(LoraplexError):
    """No capacity now (queue full, the tenant's cap on requests in flight, a quota)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(LoraplexError):
    """The server cannot be reached or is not serving (starting, draining); retry later.
    Raised by a generation only when retries were exhausted or tokens had already
    arrived."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(LoraplexError):
    """The call's timeout passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CallCancelledError(LoraplexError):
    """The server or the channel cancelled the call."""

    code = grpc.StatusCode.CANCELLED


class InternalError(LoraplexError):
    """The server failed (a bug or a broken deployment, not something the caller did)."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LoraplexError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        PermissionDeniedError,
        UnauthenticatedError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CallCancelledError,
        InternalError,
    )
}


def from_rpc_error(exc: grpc.RpcError) -> LoraplexError:
    """The typed error for a failed gRPC call (sync or aio); statuses without a class
    of their own (UNKNOWN, UNIMPLEMENTED, ...) are a `LoraplexError` carrying them."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    message: str = exc.details() or code.name.lower().replace("_", " ")  # type: ignore[attr-defined]
    cls = _BY_CODE.get(code)
    return cls(message) if cls is not None else LoraplexError(message, code)
