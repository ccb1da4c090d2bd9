"""Errors of the HTTP API in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`. A refusal gets its gRPC status and sentence from the engine's one table
(`engine.server.statuses`), then its HTTP status from the gRPC code here: it reads the
same on both APIs, only the envelope differs. `code` is the gRPC status name in lower
case (`not_found`, `resource_exhausted`, ...)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from engine.server.statuses import status_of

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type). Anything else is the server's fault.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
_SERVER_ERROR = (500, "server_error")
# Errors aiohttp raises itself (no route, wrong method, body too large): their status
# stands, the body takes OpenAI's shape.
_HTTP_ONLY = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def error_body(code: grpc.StatusCode, message: str) -> tuple[int, dict]:
    """(HTTP status, body) for a refusal with gRPC status `code`."""
    status, kind = HTTP_STATUS.get(code, _SERVER_ERROR)
    return status, _body(message, kind, code.name.lower())


def error_response(code: grpc.StatusCode, message: str) -> web.Response:
    status, body = error_body(code, message)
    return web.json_response(body, status=status)


def _body(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves in OpenAI's shape: refusals through the tables, aiohttp's own
    HTTP errors with their status, and a bug as a 500 whose details go to the log."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_ONLY.get(exc.status, "invalid_request_error")
        message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 404:
            message += " (this engine serves /v1/chat/completions, /v1/completions, /v1/models)"
        return web.json_response(_body(message, kind, None), status=exc.status)
    except ConnectionResetError:  # the client left: nobody to answer
        raise
    except Exception as exc:
        refusal = status_of(exc)
        if refusal is not None:
            return error_response(*refusal)
        log.exception("the HTTP API failed on %s %s", request.method, request.path)
        status, kind = _SERVER_ERROR
        return web.json_response(
            _body("the engine failed on this request; see its log", kind, None), status=status
        )
