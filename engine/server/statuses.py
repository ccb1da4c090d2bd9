"""The gRPC status each refusal of the engine answers with: one table, by exception class.

Both gRPC servicers apply it at their edge (`translated`), the generation path builds
its refusals from it (so both front ends count and answer them alike), and the HTTP API
maps the same gRPC code to its HTTP status (`openai_errors`): a failure reads the same
everywhere. An exception whose class is not in the table is a bug, not a refusal: it
is left alone, and gRPC logs it and answers UNKNOWN.

The codes are DESIGN.md's, chosen for what the caller can do next: INVALID_ARGUMENT
(fix the request or the adapter folder), FAILED_PRECONDITION (a well-formed adapter
that cannot run on this base model or engine), PERMISSION_DENIED (a path the engine may
not read), NOT_FOUND, UNAVAILABLE (retry later or on another engine: an adapter being
evicted, one still being loaded).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import grpc

from engine.formats.errors import AdapterFormatError, status_name
from engine.lora.errors import (
    AdapterConflictError,
    AdapterEvictingError,
    AdapterLoadingError,
    AdapterNotFoundError,
)
from engine.server.validation import InvalidRequest

Method = TypeVar("Method", bound=Callable[..., Any])


class Refused(Exception):
    """A call refused with the gRPC status `code`; `message` tells the caller what to do.
    For refusals decided in the servicers and the generation path themselves."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Rule(NamedTuple):
    code: grpc.StatusCode | Callable[[Any], grpc.StatusCode]  # fixed, or read off the error
    message: Callable[[Any], str] = str


# The nearest class in an error's MRO decides, so a subclass answers as its base unless
# it has a line of its own.
STATUSES: dict[type[Exception], _Rule] = {
    Refused: _Rule(lambda exc: exc.code, lambda exc: exc.message),  # also auth's AuthError
    InvalidRequest: _Rule(grpc.StatusCode.INVALID_ARGUMENT),
    AdapterFormatError: _Rule(lambda exc: grpc.StatusCode[status_name(exc)]),
    AdapterNotFoundError: _Rule(grpc.StatusCode.NOT_FOUND, lambda exc: f"{exc}; check the name"),
    AdapterConflictError: _Rule(grpc.StatusCode.FAILED_PRECONDITION),
    AdapterEvictingError: _Rule(grpc.StatusCode.UNAVAILABLE),
    AdapterLoadingError: _Rule(
        grpc.StatusCode.UNAVAILABLE, lambda exc: f"{exc}; retry in a few seconds"
    ),
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, sentence) the table gives `exc`; None when its class is not in it."""
    for cls in type(exc).__mro__:
        rule = STATUSES.get(cls)
        if rule is not None:
            code = rule.code if isinstance(rule.code, grpc.StatusCode) else rule.code(exc)
            return code, rule.message(exc)
    return None


def translated(method: Method) -> Method:
    """A servicer method (unary, or a response stream) whose refusals leave as their
    status and sentence from the table; any other exception passes."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async with contextlib.aclosing(method(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except Exception as exc:
                await _abort(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            await _abort(context, exc)

    return unary  # type: ignore[return-value]


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    status = status_of(exc)
    if status is None:
        raise exc
    await context.abort(*status)
