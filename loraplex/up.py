"""`loraplex up`: the whole stack on one machine, no Docker, and a demo that shows it
working. Starts a control plane on an embedded SQLite file and one engine on the
bundled SmolLM2-135M-Instruct (CPU unless a GPU is there), then, as an admin and a
tenant would: registers the base model, a tenant, an API key and an adapter, waits
until the adapter is placed on the engine, and streams an answer with and without it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.v1 import control_plane_pb2 as cp
from loraplex.v1 import control_plane_pb2_grpc as cp_grpc
from loraplex.v1 import inference_pb2, inference_pb2_grpc

QUESTION = "In one sentence, what is a LoRA adapter?"


def add_command(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="start control plane + engine on the default model")
    up.add_argument(
        "--data-dir",
        default=os.environ.get(
            "LORAPLEX_DATA_DIR", str(Path.home() / ".local" / "share" / "loraplex")
        ),
    )
    up.add_argument("--control-plane-port", type=int, default=50050)
    up.add_argument("--engine-port", type=int, default=50051)
    up.add_argument("--device", default="auto")
    up.add_argument(
        "--demo-only",
        action="store_true",
        help="stop the stack after the demo instead of serving on",
    )
    up.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loraplex.cli import default_cache_dir, resolve_model_path
    from loraplex.demo_adapter import write_demo_adapter

    data = Path(args.data_dir).expanduser()
    adapters = data / "adapters"
    logs = data / "logs"
    adapters.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_path("default", default_cache_dir())
    token = os.environ.get("LORAPLEX_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    cp_addr = f"127.0.0.1:{args.control_plane_port}"
    engine_addr = f"127.0.0.1:{args.engine_port}"
    env = {**os.environ, "LORAPLEX_ADMIN_TOKEN": token}
    me = [sys.executable, "-m", "loraplex.cli"]

    processes = [
        _start(
            me
            + [
                "control-plane",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.control_plane_port),
                "--database-url",
                f"sqlite:///{data / 'control-plane.db'}",
                "--adapter-root",
                str(adapters),
            ],
            env,
            logs / "control-plane.log",
        ),
    ]
    try:
        _wait_healthy(cp_addr, "control plane", logs / "control-plane.log", processes[0])
        admin = cp_grpc.ControlPlaneStub(grpc.insecure_channel(cp_addr))
        auth = [("authorization", f"Bearer {token}")]
        base = _idempotent(
            lambda: admin.RegisterBaseModel(
                cp.RegisterBaseModelRequest(name=model_dir.name, path=str(model_dir)), metadata=auth
            )
        )
        print(f"base model {model_dir.name} registered" + (" (already)" if base is None else ""))
        processes.append(
            _start(
                me
                + [
                    "engine",
                    "serve",
                    "--model",
                    str(model_dir),
                    "--device",
                    args.device,
                    "--port",
                    str(args.engine_port),
                    "--control-plane",
                    cp_addr,
                    "--advertise",
                    engine_addr,
                    "--adapter-root",
                    str(adapters),
                ],
                env,
                logs / "engine.log",
            )
        )
        _wait_healthy(engine_addr, "engine", logs / "engine.log", processes[1], timeout=300)
        key = _demo(admin, auth, model_dir, adapters, engine_addr, write_demo_adapter)
        print(f"\nstack up: control plane {cp_addr}, engine {engine_addr}")
        print(f"  admin token: {token}\n  demo tenant key: {key}\n  logs: {logs}")
        if args.demo_only:
            return 0
        print("serving; Ctrl-C stops everything")
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        print("a component exited; see the logs", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:  # a component did not come up; its log says why
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for p in reversed(processes):
            p.terminate()
        for p in processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _demo(admin, auth, model_dir: Path, adapters: Path, engine_addr: str, write_adapter) -> str:
    _idempotent(lambda: admin.CreateTenant(cp.CreateTenantRequest(name="demo"), metadata=auth))
    # One demo key at a time: the previous run's key (its secret was shown once) goes.
    for old in admin.ListApiKeys(cp.ListApiKeysRequest(tenant="demo"), metadata=auth).keys:
        if not old.revoked:
            admin.RevokeApiKey(cp.RevokeApiKeyRequest(key_id=old.key_id), metadata=auth)
    key = admin.CreateApiKey(cp.CreateApiKeyRequest(tenant="demo"), metadata=auth).api_key
    folder = adapters / "demo-example"
    if not (folder / "adapter_model.safetensors").exists():
        write_adapter(model_dir, folder)
    version = admin.RegisterAdapter(
        cp.RegisterAdapterRequest(
            tenant="demo", name="example", uri=str(folder), base_model=model_dir.name
        ),
        metadata=auth,
    )
    print(
        f"adapter {version.adapter_id} registered (rank {version.rank}, "
        f"sha256 {version.sha256[:12]}...)"
    )
    deadline = time.monotonic() + 60
    while (
        engine_addr
        not in admin.ResolveAdapter(
            cp.ResolveAdapterRequest(adapter="demo/example"), metadata=auth
        ).endpoints
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the adapter was not placed on the engine within 60 s")
        time.sleep(0.2)
    print("adapter placed on the engine")
    # The key reaches the engine with the next key sync (within seconds).
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(engine_addr))
    for adapter in ("", "demo/example"):
        print(f"\n> {QUESTION}  [adapter: {adapter or 'base model'}]")
        _stream(stub, adapter, [("authorization", f"Bearer {key}")])
    return key


def _stream(stub, adapter: str, metadata) -> None:
    request = inference_pb2.GenerateRequest(
        adapter=adapter, sampling=inference_pb2.SamplingParams(max_new_tokens=48)
    )
    request.chat.messages.add(role="user", content=QUESTION)
    deadline = time.monotonic() + 15
    while True:
        try:
            for response in stub.Generate(request, metadata=metadata):
                print(response.text, end="", flush=True)
            print()
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # the new key is not on the engine yet


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_healthy(
    address: str, what: str, log: Path, process: subprocess.Popen, timeout: float = 120
) -> None:
    print(f"starting the {what} on {address} (log: {log}) ...", flush=True)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {what} exited at start (code {process.returncode}); see {log}")
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the {what} did not become healthy in {timeout:.0f} s; see {log}")


def _idempotent(call):
    """Runs an admin call; ALREADY_EXISTS (a previous `up`) is fine and returns None."""
    try:
        return call()
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
            return None
        raise
