"""`loraplex control-plane|tenants|keys|base-models|adapters|engines ...` commands.

`control-plane serve|migrate` run the server and the migrations; the rest are thin
clients of the ControlPlane gRPC API. Flags fall back to LORAPLEX_* environment
variables, read here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from control_plane import tables
from control_plane.config import DEFAULT_PORT
from control_plane.db import sqlite_url
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import control_plane_pb2_grpc as pb_grpc

DEFAULT_SQLITE = Path("~/.local/share/loraplex/control-plane.db")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    _add_server(subparsers)
    _add_clients(subparsers)


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _add_server(subparsers: argparse._SubParsersAction) -> None:
    cp = subparsers.add_parser("control-plane", help="run the control plane")
    sub = cp.add_subparsers(dest="control_plane_command", required=True)
    database = {"default": _env("LORAPLEX_DATABASE_URL"),
                "help": "postgresql://... (LORAPLEX_DATABASE_URL); default: an embedded "
                        f"SQLite file {DEFAULT_SQLITE}"}
    serve = sub.add_parser("serve", help="serve the ControlPlane gRPC API and reconcile engines")
    serve.add_argument("--database-url", **database)
    serve.add_argument("--admin-token", default=_env("LORAPLEX_ADMIN_TOKEN"))
    serve.add_argument("--adapter-root", action="append", help="adapters may be registered "
                       "from under this folder (repeatable; LORAPLEX_ADAPTER_ROOTS, ':'-separated)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--metrics-port", type=int, default=0,
                       help="serve Prometheus /metrics on this port (0 = off)")
    serve.add_argument("--default-max-adapters", type=int, default=100)
    serve.add_argument("--default-max-lora-rank", type=int, default=64)
    serve.add_argument("--reconcile-interval", type=float, default=2.0, help="seconds")
    serve.add_argument("--heartbeat-timeout", type=float, default=10.0,
                       help="seconds without a heartbeat before an engine is stale")
    serve.add_argument("--migrate", action="store_true",
                       help="run the migrations at start (always on for SQLite)")
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="upgrade the database to the latest schema")
    migrate.add_argument("--database-url", **database)
    migrate.set_defaults(func=_migrate)


def _database_url(value: str) -> str:
    return value or sqlite_url(DEFAULT_SQLITE.expanduser())


def _serve(args: argparse.Namespace) -> int:
    from control_plane.config import ControlPlaneConfig
    from control_plane.reconciler.loop import ReconcilerConfig
    from control_plane.server import NotMigratedError, serve_control_plane

    url = _database_url(args.database_url)
    roots = args.adapter_root or [p for p in _env("LORAPLEX_ADAPTER_ROOTS").split(":") if p]
    try:
        config = ControlPlaneConfig(
            database_url=url, admin_token=args.admin_token,
            adapter_roots=tuple(Path(r).expanduser().resolve() for r in roots),
            host=args.host, port=args.port, metrics_port=args.metrics_port,
            default_max_adapters=args.default_max_adapters,
            default_max_lora_rank=args.default_max_lora_rank,
            auto_migrate=args.migrate or url.startswith("sqlite"),
            reconciler=ReconcilerConfig(interval_s=args.reconcile_interval,
                                        heartbeat_timeout_s=args.heartbeat_timeout),
        )
        asyncio.run(serve_control_plane(config))
    except (ValueError, NotMigratedError, RuntimeError, OSError) as exc:  # a port taken
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from control_plane import migrate

    url = _database_url(args.database_url)
    migrate.upgrade(url)
    print(f"database at revision {migrate.head_revision()}")
    return 0


def _add_clients(subparsers: argparse._SubParsersAction) -> None:
    def group(name: str, help_text: str) -> argparse._SubParsersAction:
        parser = subparsers.add_parser(name, help=help_text)
        return parser.add_subparsers(dest=f"{name}_command", required=True)

    def command(parent: argparse._SubParsersAction, name: str, run: Callable[..., Any],
                help_text: str) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text)
        parser.add_argument("--target", default=_env("LORAPLEX_CONTROL_PLANE",
                                                     f"127.0.0.1:{DEFAULT_PORT}"))
        parser.add_argument("--admin-token", default=_env("LORAPLEX_ADMIN_TOKEN"))
        parser.set_defaults(func=lambda args: _call(args, run))
        return parser

    tenants = group("tenants", "create, list and disable tenants")
    p = command(tenants, "create", _tenants_create, "create a tenant")
    p.add_argument("name")
    p.add_argument("--max-adapters", type=int, default=0)
    command(tenants, "list", _tenants_list, "list tenants")
    command(tenants, "disable", _tenants_disable, "disable a tenant").add_argument("name")

    keys = group("keys", "create, list and revoke API keys")
    command(keys, "create", _keys_create, "create an API key (shown once)").add_argument("tenant")
    command(keys, "revoke", _keys_revoke, "revoke an API key").add_argument("key_id")
    command(keys, "list", _keys_list, "list API keys").add_argument("--tenant", default="")

    models = group("base-models", "register and list base models")
    p = command(models, "register", _models_register, "register a base model folder")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--max-lora-rank", type=int, default=0)
    command(models, "list", _models_list, "list base models")

    adapters = group("adapters", "register, list and retire adapter versions")
    p = command(adapters, "register", _adapters_register, "register a new adapter version")
    p.add_argument("tenant")
    p.add_argument("name")
    p.add_argument("uri", help="local path or file:// URI under the adapter roots")
    p.add_argument("--base-model", required=True)
    p.add_argument("--sha256", default="")
    p.add_argument("--replicas", type=int, default=0, help="0 = every engine of the base model")
    command(adapters, "list", _adapters_list, "list adapters").add_argument("--tenant", default="")
    p = command(adapters, "retire", _adapters_retire, "retire a version (default: all)")
    p.add_argument("tenant")
    p.add_argument("name")
    p.add_argument("--version", type=int, default=0)

    engines = group("engines", "list engines")
    command(engines, "list", _engines_list, "list engines and their state")


def _call(args: argparse.Namespace, run: Callable[[Any, argparse.Namespace], str]) -> int:
    metadata = (("authorization", f"Bearer {args.admin_token}"),)
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.ControlPlaneStub(channel)

        def rpc(name: str, request: Any) -> Any:
            return getattr(stub, name)(request, metadata=metadata, timeout=60)

        try:
            print(run(rpc, args))
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


Rpc = Callable[[str, Any], Any]


def _tenants_create(rpc: Rpc, a: argparse.Namespace) -> str:
    return tables.tenants([rpc("CreateTenant", pb.CreateTenantRequest(
        name=a.name, max_adapters=a.max_adapters))])


def _tenants_list(rpc: Rpc, a: argparse.Namespace) -> str:
    return tables.tenants(rpc("ListTenants", pb.ListTenantsRequest()).tenants)


def _tenants_disable(rpc: Rpc, a: argparse.Namespace) -> str:
    return tables.tenants([rpc("DisableTenant", pb.DisableTenantRequest(name=a.name))])


def _keys_create(rpc: Rpc, a: argparse.Namespace) -> str:
    key = rpc("CreateApiKey", pb.CreateApiKeyRequest(tenant=a.tenant))
    return (f"key id:  {key.key_id}\ntenant:  {key.tenant}\napi key: {key.api_key}\n"
            "Store the API key now: it is not shown again.")


def _keys_revoke(rpc: Rpc, a: argparse.Namespace) -> str:
    return tables.keys([rpc("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=a.key_id))])


def _keys_list(rpc: Rpc, a: argparse.Namespace) -> str:
    return tables.keys(rpc("ListApiKeys", pb.ListApiKeysRequest(tenant=a.tenant)).keys)


def _models_register(rpc: Rpc, a: argparse.Namespace) -> str:
    path = str(Path(a.path).expanduser().resolve())
    return tables.base_models([rpc("RegisterBaseModel", pb.RegisterBaseModelRequest(
        name=a.name, path=path, max_lora_rank=a.max_lora_rank))])


def _models_list(rpc: Rpc, a: argparse.Namespace) -> str:
    return tables.base_models(rpc("ListBaseModels", pb.ListBaseModelsRequest()).base_models)


def _adapters_register(rpc: Rpc, a: argparse.Namespace) -> str:
    uri = a.uri if "://" in a.uri else str(Path(a.uri).expanduser().resolve())
    return tables.versions([rpc("RegisterAdapter", pb.RegisterAdapterRequest(
        tenant=a.tenant, name=a.name, uri=uri, base_model=a.base_model, sha256=a.sha256,
        replicas=a.replicas))])


def _adapters_list(rpc: Rpc, a: argparse.Namespace) -> str:
    found: list[pb.Adapter] = []
    token = ""
    while True:
        page = rpc("ListAdapters", pb.ListTenantAdaptersRequest(tenant=a.tenant,
                                                                page_token=token))
        found.extend(page.adapters)
        token = page.next_page_token
        if not token:
            return tables.adapters(found)


def _adapters_retire(rpc: Rpc, a: argparse.Namespace) -> str:
    reply = rpc("RetireAdapter", pb.RetireAdapterRequest(tenant=a.tenant, name=a.name,
                                                         version=a.version))
    if not reply.retired:
        return "nothing to retire: those versions were already retired"
    return tables.versions(reply.retired)


def _engines_list(rpc: Rpc, a: argparse.Namespace) -> str:
    return tables.engines(rpc("ListEngines", pb.ListEnginesRequest()).engines)
