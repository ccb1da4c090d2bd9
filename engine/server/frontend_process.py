"""The engine's side of its front-end process (`--frontend-process`).

Why a second process: at a few hundred streams, gRPC's own work per streamed message
(asyncio, Cython, serialization) took the larger share of the one GIL the engine
loop needs as well, so the host, not the GPU, set the pace of every step (the
py-spy profiles in bench/results/serving_h200.md). The front end owns the public port
and every stream's messages; the engine process keeps what needs its state: admission,
keys, adapters, the engine loop, and its own gRPC server, on loopback only, for the
EngineAdmin calls the front end forwards.

`FrontendProcess.start` spawns the front end over a socket pair and waits until it has
bound the public port. Each Generate call the front end receives arrives here as an
"open" event and runs through `GenerationService.open`, exactly as a call to the engine's
own server would (same admission, refusals and aborts); its outputs go back in one
frame per engine step (`engine.server.frontend_link`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys

import grpc

from engine.server.frontend_link import Event, FrontendConfig, Outbox, encode, read_events
from engine.server.generation import GenerationService
from engine.server.statuses import status_of
from loraplex.v1 import inference_pb2

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0


class FrontendProcess:
    def __init__(
        self,
        service: GenerationService,
        process: subprocess.Popen,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        port: int,
    ) -> None:
        self.port = port  # the public port the front end bound
        self._service = service
        self._process = process
        self._reader = reader
        self._writer = writer
        self._outbox = Outbox(writer)
        self._calls: dict[int, asyncio.Task] = {}
        self._reading: asyncio.Task | None = None
        self._exited = asyncio.Event()  # the link closed while serving (not by stop())

    @classmethod
    async def start(cls, config: FrontendConfig, service: GenerationService) -> FrontendProcess:
        """Spawns the front end; returns once it serves `config.port`. OSError (with the
        front end's sentence) when it cannot bind it or does not start."""
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "engine.server.frontend", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(encode([("config", config)]))
        try:
            events = await asyncio.wait_for(read_events(reader), _START_TIMEOUT_S)
        except TimeoutError:
            events = None
        if not events or events[0][0] != "bound":
            writer.close()
            _end(process)
            reason = events[0][1] if events else "it exited or did not answer"
            raise OSError(f"the front-end process could not start: {reason}")
        frontend = cls(service, process, reader, writer, events[0][1])
        frontend._reading = asyncio.create_task(frontend._read())
        return frontend

    def set_health(self, service: str | None, serving: bool) -> None:
        """Mirrors one of the engine's health statuses on the public port (`service`
        None: all NOT_SERVING for good)."""
        self._outbox.post(("health", service, serving))

    @property
    def exited(self) -> bool:
        """The front end went away by itself (a crash, a kill): the public port is gone."""
        return self._exited.is_set()

    @property
    def exit_code(self) -> int | None:
        return self._process.poll()

    async def wait_exited(self) -> None:
        """Returns once the front end has gone by itself and its process has ended."""
        await self._exited.wait()
        await asyncio.to_thread(_end, self._process)

    async def stop(self) -> None:
        """Ends the calls still open (their callers see the stream end), closes the link
        and waits for the front end to exit."""
        if self._reading is not None:
            self._reading.cancel()
        for call in list(self._calls.values()):
            call.cancel()
        await asyncio.gather(*self._calls.values(), return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        await asyncio.to_thread(_end, self._process)

    async def _read(self) -> None:
        while (events := await read_events(self._reader)) is not None:
            for event in events:
                if event[0] == "open":
                    sid = event[1]
                    self._calls[sid] = asyncio.create_task(self._generate(*event[1:]))
                elif event[0] == "abort" and (call := self._calls.get(event[1])) is not None:
                    call.cancel()  # leaves the service's block, which aborts the request
        log.error("the front-end process has gone; its calls are cancelled")
        for call in list(self._calls.values()):
            call.cancel()
        self._exited.set()

    async def _generate(
        self, sid: int, request_bytes: bytes, authorization: str, peer: str
    ) -> None:
        post = self._outbox.post
        try:
            request = inference_pb2.GenerateRequest.FromString(request_bytes)
            async with self._service.open(request, authorization or None, peer) as generation:
                post(("head", sid, generation.request_id, generation.adapter_id or ""))
                await generation.forward(lambda out: post(_out_event(sid, out)))
        except asyncio.CancelledError:
            pass  # the caller went away: nobody to tell
        except Exception as exc:
            status = status_of(exc)
            if status is None:
                log.exception("Generate failed")
                status = (grpc.StatusCode.INTERNAL, "the engine hit an internal error")
            post(("refused", sid, status[0].name, status[1]))
        finally:
            self._calls.pop(sid, None)


def _out_event(sid: int, out) -> Event:
    finish = out.finish_reason.value if out.finish_reason is not None else ""
    return (
        "out", sid, out.text, out.token_ids, finish,
        out.prompt_tokens, out.completion_tokens, out.error,
    )  # fmt: skip


def _end(process: subprocess.Popen) -> None:
    """Waits for the front end to exit after its link closed; kills it if it does not."""
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
