"""The admin token check in front of every ControlPlane RPC but ResolveAdapter."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

SERVICE_PREFIX = "/loraplex.v1.ControlPlane/"
# Checked by the servicer itself: it also accepts a tenant's API key.
OPEN_METHODS = frozenset({SERVICE_PREFIX + "ResolveAdapter"})


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The bearer token sent; None without authorization metadata, "" when it is empty
    or not of the Bearer scheme."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def is_admin_token(presented: str | None, admin_token: str) -> bool:
    return bool(presented) and hmac.compare_digest((presented or "").encode(), admin_token.encode())


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, admin_token: str) -> None:
        self._admin_token = admin_token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if not method.startswith(SERVICE_PREFIX) or method in OPEN_METHODS:
            return await continuation(details)
        token = bearer_token(details.invocation_metadata)  # type: ignore[arg-type]
        if token is None:
            return _refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send 'authorization: Bearer <admin token>'",
            )
        if not token:  # e.g. a client started with LORAPLEX_ADMIN_TOKEN unset
            return _refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                "no admin token sent (the authorization metadata must read "
                "'Bearer <admin token>'); set LORAPLEX_ADMIN_TOKEN or pass "
                "--admin-token",
            )
        if token.startswith("lpx_"):
            return _refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                "a tenant's API key cannot call admin RPCs; use the admin token",
            )
        if not is_admin_token(token, self._admin_token):
            return _refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                "the admin token is wrong; admin RPCs need the control plane's "
                "admin token (LORAPLEX_ADMIN_TOKEN)",
            )
        return await continuation(details)


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)
