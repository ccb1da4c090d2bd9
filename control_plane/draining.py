"""Draining the control plane's gRPC server before it stops.

Once draining, new ControlPlane calls are refused with UNAVAILABLE and a sentence,
while the calls in flight run on; `wait_idle` says when they are done. Health and
reflection pass untouched, so a load balancer keeps reading NOT_SERVING during the
drain instead of a closed port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

SHUTTING_DOWN = (
    "the control plane is shutting down; retry in a moment (another replica, or this "
    "one once it is back, will answer)"
)


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts the unary calls in flight on methods under `service_prefix`
    (e.g. "/loraplex.v1.ControlPlane/"). Use on the server's event loop only."""

    def __init__(self, service_prefix: str) -> None:
        self._prefix = service_prefix
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def start_draining(self) -> None:
        """Refuse every call that has not started yet."""
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the calls in flight to end; whether they did."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        if not details.method.startswith(self._prefix):
            return handler
        inner = handler.unary_unary

        async def tracked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # Checked when the call starts, not when it arrived: nothing can slip in
            # between this check and the count (one event loop).
            if self._draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            self._in_flight += 1
            self._idle.clear()
            try:
                return await inner(request, context)
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()

        return grpc.unary_unary_rpc_method_handler(
            tracked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
