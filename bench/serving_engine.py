"""A real `loraplex engine serve` process for the benchmark: spawn it, time its start
(gRPC health SERVING, then every adapter listed by EngineAdmin.ListAdapters), scrape its
Prometheus endpoint, and stop it (SIGINT, then SIGKILL after a timeout).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.v1 import engine_admin_pb2, engine_admin_pb2_grpc

# Variables that would make the engine enforce keys or dial a control plane.
_SCRUBBED_ENV = ("LORAPLEX_ADMIN_TOKEN", "LORAPLEX_CONTROL_PLANE", "LORAPLEX_ADAPTER_ROOTS")


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why (and where the engine log is)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EngineProcess:
    """One engine process. Use as a context manager so it is stopped on every path."""

    def __init__(
        self, engine_args: list[str], log_path: Path, engine_root: Path | None = None
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = log_path
        self.command = [
            sys.executable,
            "-m",
            "loraplex.cli",
            "engine",
            "serve",
            *engine_args,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
        ]
        self._engine_root = engine_root
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self.spawned_at = 0.0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The engine process's id (spawned: inside the `with` block)."""
        assert self._proc is not None, "the engine is not running"
        return self._proc.pid

    def wait_serving(self, timeout_s: float) -> float:
        """Poll gRPC health until SERVING; seconds from spawn. BenchError when the
        process dies or `timeout_s` passes (works whatever EngineAdmin requires).

        Every poll dials a fresh channel, as a readiness probe does: a channel whose
        connects were refused waits out a growing reconnect backoff (tens of seconds
        after a minute of refusals) and would see the open port that much late."""
        deadline = self.spawned_at + timeout_s
        while True:
            self._check_alive("starting")
            with grpc.insecure_channel(self.target) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - self.spawned_at
                except grpc.RpcError:
                    pass
            self._check_deadline(deadline, timeout_s, "to report SERVING")
            time.sleep(0.1)

    def __enter__(self) -> EngineProcess:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        cwd = None
        if self._engine_root is not None:
            cwd = str(self._engine_root)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self._engine_root), *filter(None, [env.get("PYTHONPATH")])]
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("w")
        self.spawned_at = time.monotonic()
        self._proc = subprocess.Popen(
            self.command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT, wait `timeout_s`, then SIGKILL. Returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def annotate(self, exc: BenchError) -> BenchError:
        """`exc`, with the engine's exit code and log tail when the engine has died."""
        if self._proc is None or self._proc.poll() is None:
            return exc
        return BenchError(
            f"{exc}\nthe engine exited with code {self._proc.returncode}; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def _check_alive(self, what: str) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise BenchError(
                f"the engine exited with code {self._proc.returncode} while {what}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )

    def wait_ready(self, num_adapters: int, timeout_s: float) -> dict[str, Any]:
        """Poll health, then ListAdapters until `num_adapters` are listed. Returns seconds
        from spawn to each. Raises BenchError if the process dies or time runs out."""
        deadline = self.spawned_at + timeout_s
        serving_s = self.wait_serving(timeout_s)
        channel = grpc.insecure_channel(self.target)
        try:
            admin = engine_admin_pb2_grpc.EngineAdminStub(channel)
            listed = 0
            while True:
                self._check_alive("preloading adapters")
                try:
                    reply = admin.ListAdapters(engine_admin_pb2.ListAdaptersRequest(), timeout=10)
                    listed = len(reply.adapters)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise BenchError(f"ListAdapters failed: {exc.details()}") from exc
                if listed >= num_adapters:
                    break
                self._check_deadline(
                    deadline, timeout_s, f"to list {num_adapters} adapters (has {listed})"
                )
                time.sleep(0.25)
            loaded_s = time.monotonic() - self.spawned_at
            residency = Counter(
                engine_admin_pb2.Residency.Name(a.residency).removeprefix("RESIDENCY_")
                for a in reply.adapters
            )
            info = admin.GetEngineInfo(engine_admin_pb2.GetEngineInfoRequest(), timeout=10)
            return {
                "spawn_to_serving_s": serving_s,
                "spawn_to_adapters_loaded_s": loaded_s,
                "adapter_residency": dict(residency),
                "engine_info": MessageToDict(info, preserving_proto_field_name=True),
            }
        finally:
            channel.close()

    def _check_deadline(self, deadline: float, timeout_s: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise BenchError(
                f"the engine took more than {timeout_s:.0f} s {what}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()
