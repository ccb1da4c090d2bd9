"""The front-end process: the engine's public gRPC port, in a process of its own.

    python -m engine.server.frontend FD    # spawned by the engine (frontend_process.py)

It serves what a client of the engine sees, with the engine doing the deciding:
- `Inference.Generate`: each call is sent to the engine over the link (FD, a socket
  pair); the engine admits or refuses it and streams its outputs back, one frame per
  step for all calls; here they become the call's messages (several outputs that
  arrived together become one) or its status.
- `EngineAdmin`: each call is forwarded as bytes, with its metadata, to the engine's
  own server on loopback, after the same admin-token check the engine makes.
- Health mirrors the engine's (the engine sends each change); reflection lists the
  same services.
It imports no torch and holds no state a restart would lose. It exits when the link
closes (the engine stopped or died); calls still open end UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.server.frontend_link import Event, FrontendConfig, Outbox, read_events
from engine.server.responses import generate_response
from loraplex.admin_token import engine_admin_check
from loraplex.bearer import metadata_authorization
from loraplex.v1 import engine_admin_pb2, inference_pb2, inference_pb2_grpc

log = logging.getLogger("engine.server.frontend")

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN = engine_admin_pb2.DESCRIPTOR.services_by_name["EngineAdmin"].full_name
# The refusal every call still open gets once the engine has gone: (status name, sentence).
_ENGINE_GONE = ("UNAVAILABLE", "the engine has stopped; retry on another engine")


class EngineLink:
    """Calls in flight to the engine: their event queues, keyed by the call's number."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._numbers = itertools.count()
        self._calls: dict[int, asyncio.Queue[Event]] = {}
        self.closed = False

    def open(
        self, request: bytes, authorization: str | None, peer: str
    ) -> tuple[int, asyncio.Queue]:
        sid = next(self._numbers)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._calls[sid] = queue
        if self.closed:
            queue.put_nowait(("refused", sid, *_ENGINE_GONE))
        else:
            self._outbox.post(("open", sid, request, authorization, peer))
        return sid, queue

    def close(self, sid: int, aborted: bool) -> None:
        self._calls.pop(sid, None)
        if aborted and not self.closed:
            self._outbox.post(("abort", sid))

    def deliver(self, event: Event) -> None:
        queue = self._calls.get(event[1])
        if queue is not None:
            queue.put_nowait(event)

    def engine_gone(self) -> None:
        self.closed = True
        for sid, queue in self._calls.items():
            queue.put_nowait(("refused", sid, *_ENGINE_GONE))


class FrontendInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, link: EngineLink) -> None:
        self._link = link

    async def Generate(  # noqa: N802
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        authorization = metadata_authorization(context.invocation_metadata())
        sid, queue = self._link.open(request.SerializeToString(), authorization, context.peer())
        finished = False
        try:
            head = await queue.get()
            if head[0] == "refused":
                finished = True
                await context.abort(grpc.StatusCode[head[2]], head[3])
            _, _, request_id, adapter_id = head
            while not finished:
                events = [await queue.get()]
                while not queue.empty():  # arrived together: one message
                    events.append(queue.get_nowait())
                if events[-1][0] == "refused":  # the engine went away mid-stream
                    finished = True
                    await context.abort(grpc.StatusCode[events[-1][2]], events[-1][3])
                finished = bool(events[-1][4])
                yield _response(events, request_id, adapter_id)
        finally:
            self._link.close(sid, aborted=not finished)


def _response(
    events: list[Event], request_id: str, adapter_id: str
) -> inference_pb2.GenerateResponse:
    """One message for `("out", ...)` events in order: their text and tokens joined, the
    finish and usage of the last."""
    _, _, _, _, finish, prompt_tokens, completion_tokens, error = events[-1]
    return generate_response(
        "".join(event[2] for event in events),
        [token for event in events for token in event[3]],
        request_id, adapter_id, finish, error, prompt_tokens, completion_tokens,
    )  # fmt: skip


class AdminForwarder(grpc.GenericRpcHandler):
    """Every EngineAdmin call, forwarded unparsed with its metadata to the engine."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if not details.method.startswith(f"/{ADMIN}/"):
            return None
        call = self._channel.unary_unary(details.method)  # bytes in, bytes out

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = [
                (key, value)
                for key, value in context.invocation_metadata() or ()
                if not key.startswith((":", "grpc-"))
            ]
            try:
                return await call(request, metadata=metadata, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return grpc.unary_unary_rpc_method_handler(forward)


async def serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    events = await read_events(reader)
    if not events or events[0][0] != "config":
        return
    config: FrontendConfig = events[0][1]
    outbox = Outbox(writer)
    link = EngineLink(outbox)
    channel = grpc.aio.insecure_channel(config.engine_target)
    server = grpc.aio.server(
        interceptors=[engine_admin_check(config.admin_token)],
        options=[("grpc.so_reuseport", 0)],  # a taken port must fail, not split traffic
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(FrontendInference(link), server)
    server.add_generic_rpc_handlers([AdminForwarder(channel)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (INFERENCE, ADMIN, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError as exc:  # grpc's way of saying the port is taken
        outbox.post(("failed", f"cannot bind {config.host}:{config.port}: {exc}"))
        await asyncio.sleep(0)  # let the outbox flush
        await writer.drain()
        return
    await server.start()
    outbox.post(("bound", port))
    try:
        while (events := await read_events(reader)) is not None:
            for event in events:
                if event[0] == "health":
                    await _set_health(health_servicer, event[1], event[2])
                else:
                    link.deliver(event)
    finally:
        link.engine_gone()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=1)
        await channel.close()


async def _set_health(
    servicer: health.aio.HealthServicer, service: str | None, serving: bool
) -> None:
    if service is None:
        await servicer.enter_graceful_shutdown()
        return
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    await servicer.set(service, status)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s frontend %(levelname)s %(message)s")
    # Ctrl-C reaches the whole process group: the engine drains and then closes the
    # link, which ends this process; leaving at once would cut the calls it drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(serve(socket.socket(fileno=int(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
