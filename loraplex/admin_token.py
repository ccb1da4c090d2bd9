"""The admin token check both servers put in front of their admin RPCs: every
EngineAdmin RPC of an engine, every ControlPlane RPC of the control plane but those
that check their callers themselves (ResolveAdapter also takes a tenant's key).

One interceptor, so the rule and its sentences are the same on both: a call must carry
`authorization: Bearer <admin token>`, compared in constant time. A tenant's API key
is recognised and refused PERMISSION_DENIED (it names a caller, just not an admin);
anything else missing or wrong is UNAUTHENTICATED. A server run without an admin token
(an engine started standalone; the control plane always has one) answers its admin
RPCs to callers on the same machine only, so one bound to a public address is not open
to whoever reaches its port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from loraplex.bearer import bearer_token, metadata_authorization, tokens_match
from loraplex.key_guard import peer_host
from loraplex.keys import KEY_PREFIX


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses the calls of `service` (a full name, `loraplex.v1.EngineAdmin`) but
    `open_methods` that do not pass `admin_refusal`. `rpcs` and `server` name them in
    its sentences ("EngineAdmin", "engine"). The check runs when the call starts, where
    the caller's address is known."""

    def __init__(
        self,
        service: str,
        admin_token: str,
        *,
        rpcs: str,
        server: str,
        open_methods: Iterable[str] = (),
    ) -> None:
        self._prefix = f"/{service}/"
        self._open = frozenset(self._prefix + name for name in open_methods)
        self._admin_token = admin_token
        self._rpcs = rpcs
        self._server = server

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(self._prefix) or method in self._open:
            return handler
        if handler.unary_unary is None:  # refuse to serve rather than serve it unchecked
            raise TypeError(f"{method}: the admin token check guards unary RPCs only")
        inner = handler.unary_unary

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            authorization = metadata_authorization(context.invocation_metadata())  # type: ignore[arg-type]
            refusal = self.admin_refusal(authorization, context.peer())
            if refusal is not None:
                await context.abort(*refusal)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def admin_refusal(
        self, authorization: str | None, peer: str
    ) -> tuple[grpc.StatusCode, str] | None:
        """(code, sentence) refusing a caller with this `authorization` value from this
        gRPC `peer`; None when it may call."""
        if not self._admin_token:
            if is_loopback(peer):
                return None
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"this {self._server} runs without an admin token, so only callers on this "
                f"machine (loopback) may call {self._rpcs}; start the {self._server} with "
                "--admin-token (or LORAPLEX_ADMIN_TOKEN) to manage it from elsewhere",
            )
        token = bearer_token(authorization)
        if token is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing credentials: calls to {self._rpcs} need metadata "
                "'authorization: Bearer <admin token>'",
            )
        if not token:  # e.g. a client started with LORAPLEX_ADMIN_TOKEN unset
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "no admin token sent (the authorization metadata must read "
                "'Bearer <admin token>'); set LORAPLEX_ADMIN_TOKEN or pass --admin-token",
            )
        if token.startswith(f"{KEY_PREFIX}_"):
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"a tenant's API key cannot call {self._rpcs}; use the admin token",
            )
        if not tokens_match(token, self._admin_token):
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"the admin token is wrong; calls to {self._rpcs} need the {self._server}'s "
                "admin token (--admin-token / LORAPLEX_ADMIN_TOKEN)",
            )
        return None


def engine_admin_check(admin_token: str) -> AdminTokenInterceptor:
    """The interceptor that guards every EngineAdmin RPC of an engine's public port
    ("" = loopback callers only)."""
    return AdminTokenInterceptor(
        "loraplex.v1.EngineAdmin", admin_token, rpcs="EngineAdmin", server="engine"
    )


def is_loopback(peer: str) -> bool:
    """True for a gRPC peer on this machine: 127.0.0.0/8, ::1 (also IPv4-mapped), or a
    unix socket."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    try:
        address = ipaddress.ip_address(peer_host(peer))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
