"""The processes `loraplex up` runs: start one with its output in a log file, wait until
it answers gRPC health SERVING, stop them all."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A component in its own session: the terminal's Ctrl-C reaches `up` alone, which
    then stops the engine (it drains) before the control plane, each signalled once."""
    with log.open("ab") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(processes: list[subprocess.Popen]) -> None:
    """Engine first (it drains its streams), then the control plane; kill what lingers."""
    for p in reversed(processes):
        if p.poll() is None:
            p.terminate()
    for p in reversed(processes):
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_healthy(
    address: str,
    what: str,
    processes: dict[str, subprocess.Popen],
    log_files: dict[str, Path],
    timeout: float = 120,
) -> None:
    """Wait until `address` answers SERVING; raise RuntimeError naming the log to read if
    any started process exits or time runs out."""
    log = log_files[what]
    print(f"starting the {what.replace('_', ' ')} on {address} (log: {log}) ...", flush=True)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"the {name.replace('_', ' ')} exited (code {process.returncode}); "
                    f"see {log_files[name]}"
                )
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"the {what.replace('_', ' ')} did not become healthy in {timeout:.0f} s; see {log}"
    )
