"""Run a real control plane (gRPC on a loopback port) on a background event loop, or
`loraplex ...` server processes (`Process`) for tests that need real ones."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from control_plane.config import ControlPlaneConfig
from control_plane.server import RunningControlPlane, start_control_plane
from loraplex.v1 import control_plane_pb2_grpc

ADMIN_TOKEN = "test-admin-token-of-32-characters"
T = TypeVar("T")


class BackgroundLoop:
    """An asyncio loop in a daemon thread; `run(coro)` waits for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Client:
    """ControlPlane stub whose calls carry a bearer token (the admin's unless told)."""

    def __init__(self, channel: grpc.Channel, token: str | None) -> None:
        self._stub = control_plane_pb2_grpc.ControlPlaneStub(channel)
        self._token = token

    def __getattr__(self, method: str) -> Callable[..., Any]:
        rpc = getattr(self._stub, method)

        def call(request: Any, timeout: float = 30) -> Any:
            metadata = () if self._token is None else (("authorization", f"Bearer {self._token}"),)
            return rpc(request, metadata=metadata, timeout=timeout)

        return call


@dataclass
class ControlPlaneHandle:
    running: RunningControlPlane
    background: BackgroundLoop
    channel: grpc.Channel

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def client(self, token: str | None = ADMIN_TOKEN) -> Client:
        return Client(self.channel, token)

    def reconcile(self) -> Any:
        return self.background.run(self.running.reconciler.reconcile_once())


@contextmanager
def running_control_plane(config: ControlPlaneConfig) -> Iterator[ControlPlaneHandle]:
    background = BackgroundLoop()
    running = background.run(start_control_plane(config))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield ControlPlaneHandle(running, background, channel)
    finally:
        channel.close()
        background.run(running.stop(grace=0.5))
        background.close()


class Process:
    """A `loraplex ...` child process with its output in a log file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        env = {**os.environ, "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loraplex.cli", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
