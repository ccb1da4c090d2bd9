"""`loraplex up`: the whole stack on one machine, no Docker, and a demo that teaches.

Starts a control plane on an embedded SQLite file and one engine on the bundled
SmolLM2-135M-Instruct (CPU unless a GPU is there), then, as an admin and a tenant would:
registers the base model, the `demo` tenant, an API key and the two trained demo
adapters (demo/pirate, demo/french), waits until the engine serves them, streams one
answer from the base model and from each adapter, writes what it made to
`<data dir>/up.json`, and prints how to call each adapter from the CLI, the Python SDK,
grpcurl, curl and the openai client. A second `up` on the same data dir reuses the
tenant, key, token and adapter versions. Ctrl-C (or SIGTERM) stops every process it
started.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from control_plane.config import ControlPlaneConfig
from engine.config import EngineConfig
from engine.model.default_model import DEFAULT_MODEL, resolve_model_path
from loraplex import environment
from loraplex.demo_adapter import DEMO_ADAPTERS, DemoAdaptersMissing, install_demo_adapters
from loraplex.up_facts import AdapterFacts, UpFacts, facts_path, read_facts, write_facts
from loraplex.up_guide import TRY_PROMPT, how_to_call, summary
from loraplex.up_processes import start, stop, wait_healthy
from loraplex.v1 import control_plane_pb2 as cp
from loraplex.v1 import control_plane_pb2_grpc as cp_grpc
from loraplex.v1 import inference_pb2, inference_pb2_grpc

TENANT = "demo"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ME = [sys.executable, "-m", "loraplex.cli"]  # how `up` starts each component


def add_command(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="start control plane + engine on the default model")
    up.add_argument("--data-dir", default=str(environment.data_dir()))
    up.add_argument("--control-plane-port", type=int, default=ControlPlaneConfig.port)
    up.add_argument("--engine-port", type=int, default=EngineConfig.port)
    up.add_argument(
        "--engine-http-port",
        type=int,
        default=8000,
        help="the engine's OpenAI-compatible HTTP API (0 = off)",
    )
    up.add_argument("--device", default="auto")
    up.add_argument(
        "--demo-only",
        action="store_true",
        help="stop the stack after the demo instead of serving on",
    )
    up.set_defaults(func=run)


@dataclass(frozen=True)
class Stack:
    """Where `up` puts everything, settled before anything starts."""

    data: Path  # the data dir: SQLite file, adapters, logs, up.json
    adapter_root: Path  # the demo adapters; both components may read only here
    logs: dict[str, Path]  # component -> log file
    control_plane: str  # HOST:PORT
    engine: str  # HOST:PORT
    http_port: int  # the engine's HTTP API, 0 = off
    admin_token: str
    previous: UpFacts | None  # what the last `up` on this data dir made

    @classmethod
    def of(cls, args: argparse.Namespace) -> Stack:
        """The stack `args` ask for, its folders made; the admin token is the
        environment's, else the previous `up`'s, else a new one."""
        data = Path(args.data_dir).expanduser().resolve()
        adapter_root, logs = data / "adapters", data / "logs"
        adapter_root.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        previous = read_facts(facts_path(data))
        token = (
            environment.admin_token()
            or (previous.admin_token if previous else "")
            or secrets.token_urlsafe(24)
        )
        return cls(
            data=data,
            adapter_root=adapter_root,
            logs={"control_plane": logs / "control-plane.log", "engine": logs / "engine.log"},
            control_plane=f"127.0.0.1:{args.control_plane_port}",
            engine=f"127.0.0.1:{args.engine_port}",
            http_port=args.engine_http_port,
            admin_token=token,
            previous=previous,
        )


def run(args: argparse.Namespace) -> int:
    stack = Stack.of(args)
    processes: dict[str, subprocess.Popen] = {}
    # Ctrl-C, `kill` and a closed terminal all take one path: stop what `up` started, in
    # order. Set explicitly, since a shell starts background jobs with SIGINT ignored.
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.default_int_handler)
    try:
        facts = _bring_up(args, stack, processes)
        write_facts(facts_path(stack.data), facts)
        _show_demo(stack.engine, facts.api_key, facts.adapters)
        print("\n" + summary(facts, str(facts_path(stack.data))))
        print(how_to_call(facts), flush=True)
        if args.demo_only:
            return 0
        return _serve_on(processes)
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
        return 0
    except (RuntimeError, DemoAdaptersMissing, grpc.RpcError) as exc:
        # A component did not come up or refused a call; its log says more.
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else exc
        print(f"error: {detail}", file=sys.stderr)
        return 1
    finally:
        for stop_signal in STOP_SIGNALS:  # a second Ctrl-C must not cut the stop short
            signal.signal(stop_signal, signal.SIG_IGN)
        stop(list(processes.values()))


def _bring_up(
    args: argparse.Namespace, stack: Stack, processes: dict[str, subprocess.Popen]
) -> UpFacts:
    """Starts the control plane, then the engine (each added to `processes` as it
    starts), and sets up the demo tenant as an admin would; returns what it made."""
    installed = install_demo_adapters(stack.adapter_root)
    model_dir = resolve_model_path(DEFAULT_MODEL, environment.cache_dir())
    env = environment.with_admin_token(stack.admin_token)
    cp_flags = ["--host", "127.0.0.1", "--port", str(args.control_plane_port)]
    cp_flags += ["--database-url", f"sqlite:///{stack.data / 'control-plane.db'}"]
    cp_flags += ["--adapter-root", str(stack.adapter_root)]
    cp_command = ["control-plane", "serve", *cp_flags]
    _start(stack, processes, "control_plane", stack.control_plane, cp_command, env)
    admin = cp_grpc.ControlPlaneStub(grpc.insecure_channel(stack.control_plane))
    auth = [("authorization", f"Bearer {stack.admin_token}")]
    _register_base_model(admin, auth, model_dir)
    engine_flags = ["--model", str(model_dir), "--device", args.device]
    engine_flags += ["--port", str(args.engine_port), "--adapter-root", str(stack.adapter_root)]
    engine_flags += ["--control-plane", stack.control_plane, "--advertise", stack.engine]
    if stack.http_port:
        engine_flags += ["--http-port", str(stack.http_port)]
    engine_command = ["engine", "serve", *engine_flags]
    _start(stack, processes, "engine", stack.engine, engine_command, env, timeout=300)
    _idempotent(lambda: admin.CreateTenant(cp.CreateTenantRequest(name=TENANT), metadata=auth))
    adapters = _register_adapters(admin, auth, model_dir.name, installed)
    _wait_placed(admin, auth, adapters, stack.engine)
    key_id, key = _demo_key(admin, auth, stack.previous)
    return UpFacts(
        control_plane=stack.control_plane,
        engine=stack.engine,
        engine_http=f"http://127.0.0.1:{stack.http_port}" if stack.http_port else None,
        admin_token=stack.admin_token,
        tenant=TENANT,
        api_key=key,
        api_key_id=key_id,
        base_model=model_dir.name,
        adapters=adapters,
        logs={name: str(path) for name, path in stack.logs.items()},
        pids={name: p.pid for name, p in processes.items()},
        data_dir=str(stack.data),
    )


def _start(
    stack: Stack,
    processes: dict[str, subprocess.Popen],
    name: str,
    address: str,
    command: list[str],
    env: dict[str, str],
    timeout: float = 120,
) -> None:
    """Starts component `name` (`loraplex COMMAND`, logging to its file) and waits until
    it serves on `address`."""
    processes[name] = start([*ME, *command], env, stack.logs[name])
    wait_healthy(address, name, processes, stack.logs, timeout=timeout)


def _serve_on(processes: dict[str, subprocess.Popen]) -> int:
    """Serves until Ctrl-C (KeyboardInterrupt) or until a component exits (1)."""
    print("serving; Ctrl-C stops everything", flush=True)
    while all(p.poll() is None for p in processes.values()):
        time.sleep(1)
    print("a component exited; see the logs", file=sys.stderr)
    return 1


def _register_base_model(admin, auth, model_dir: Path) -> None:
    request = cp.RegisterBaseModelRequest(name=model_dir.name, path=str(model_dir))
    created = _idempotent(lambda: admin.RegisterBaseModel(request, metadata=auth))
    print(f"base model {model_dir.name} registered" + (" (already)" if created is None else ""))


def _register_adapters(admin, auth, base_model: str, installed: dict[str, Path]):
    """Register each demo adapter; content already registered returns its version."""
    adapters = []
    for demo in DEMO_ADAPTERS:
        folder = installed[demo.name]
        request = cp.RegisterAdapterRequest(
            tenant=TENANT, name=demo.name, uri=str(folder), base_model=base_model
        )
        version = admin.RegisterAdapter(request, metadata=auth)
        print(f"adapter {version.adapter_id} ({demo.effect}, rank {version.rank}) registered")
        adapters.append(
            AdapterFacts(f"{TENANT}/{demo.name}", version.adapter_id, demo.effect, str(folder))
        )
    return adapters


def _wait_placed(admin, auth, adapters: list[AdapterFacts], engine_addr: str) -> None:
    deadline = time.monotonic() + 60
    for adapter in adapters:
        request = cp.ResolveAdapterRequest(adapter=adapter.name)
        while engine_addr not in admin.ResolveAdapter(request, metadata=auth).endpoints:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{adapter.name} was not placed on the engine within 60 s")
            time.sleep(0.2)
    print("adapters placed on the engine")


def _demo_key(admin, auth, previous: UpFacts | None) -> tuple[str, str]:
    """The previous `up`'s key if the control plane still honours it, else a new one; any
    other demo key is revoked, so the tenant holds exactly one (whose secret is in up.json)."""
    keys = admin.ListApiKeys(cp.ListApiKeysRequest(tenant=TENANT), metadata=auth).keys
    live = {k.key_id for k in keys if not k.revoked}
    if previous and previous.tenant == TENANT and previous.api_key_id in live:
        key_id, key = previous.api_key_id, previous.api_key
    else:
        created = admin.CreateApiKey(cp.CreateApiKeyRequest(tenant=TENANT), metadata=auth)
        key_id, key = created.key_id, created.api_key
    for old in live - {key_id}:
        admin.RevokeApiKey(cp.RevokeApiKeyRequest(key_id=old), metadata=auth)
    return key_id, key


def _show_demo(engine_addr: str, key: str, adapters: list[AdapterFacts]) -> None:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(engine_addr))
    for adapter in ["", *(a.name for a in adapters)]:
        print(f"\n> {TRY_PROMPT}  [adapter: {adapter or 'base model'}]")
        _stream(stub, adapter, [("authorization", f"Bearer {key}")])


def _stream(stub, adapter: str, metadata) -> None:
    request = inference_pb2.GenerateRequest(
        adapter=adapter, sampling=inference_pb2.SamplingParams(max_new_tokens=48)
    )
    request.chat.messages.add(role="user", content=TRY_PROMPT)
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
            time.sleep(0.5)  # a new key reaches the engine with the next key sync


def _idempotent(call):
    """Runs an admin call; ALREADY_EXISTS (a previous `up`) is fine and returns None."""
    try:
        return call()
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
            return None
        raise
