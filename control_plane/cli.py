"""`loraplex control-plane|tenants|keys|base-models|adapters|engines ...` commands.

`control-plane serve|migrate` run the server and the migrations; the rest are thin
clients of the ControlPlane gRPC API. A flag's default is the config field's, or the
LORAPLEX_* variable `loraplex.environment` reads.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from control_plane import tables
from control_plane.config import ControlPlaneConfig
from control_plane.db import sqlite_url
from control_plane.reconciler.config import ReconcilerConfig
from loraplex import environment
from loraplex.client import AdminClient, LoraplexError
from loraplex.keys import check_admin_token

DEFAULT_SQLITE = Path("~/.local/share/loraplex/control-plane.db")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    _add_server(subparsers)
    _add_clients(subparsers)


def _add_server(subparsers: argparse._SubParsersAction) -> None:
    cp = subparsers.add_parser("control-plane", help="run the control plane")
    sub = cp.add_subparsers(dest="control_plane_command", required=True)
    database = {
        "default": environment.database_url(),
        "help": "postgresql://... (LORAPLEX_DATABASE_URL); default: an embedded "
        f"SQLite file {DEFAULT_SQLITE}",
    }
    serve = sub.add_parser("serve", help="serve the ControlPlane gRPC API and reconcile engines")
    serve.add_argument("--database-url", **database)
    serve.add_argument(
        "--admin-token",
        default=environment.admin_token(),
        help="admin RPCs must carry it (32+ characters; LORAPLEX_ADMIN_TOKEN)",
    )
    serve.add_argument(
        "--adapter-root",
        action="append",
        help="adapters may be registered "
        "from under this folder (repeatable; without one, LORAPLEX_ADAPTER_ROOTS, "
        "':'-separated)",
    )
    serve.add_argument("--host", default=ControlPlaneConfig.host)
    serve.add_argument("--port", type=int, default=ControlPlaneConfig.port)
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=ControlPlaneConfig.metrics_port,
        help="serve Prometheus /metrics on this port (0 = off)",
    )
    serve.add_argument(
        "--default-max-adapters", type=int, default=ControlPlaneConfig.default_max_adapters
    )
    serve.add_argument(
        "--default-max-lora-rank", type=int, default=ControlPlaneConfig.default_max_lora_rank
    )
    serve.add_argument(
        "--reconcile-interval", type=float, default=ReconcilerConfig.interval_s, help="seconds"
    )
    serve.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=ReconcilerConfig.heartbeat_timeout_s,
        help="seconds without a heartbeat before an engine is stale",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=ControlPlaneConfig.shutdown_grace_s,
        help="after SIGTERM, seconds the calls in flight get to finish (health "
        "turns NOT_SERVING and new calls get UNAVAILABLE at once)",
    )
    serve.add_argument(
        "--replica-id",
        default="",
        help="this replica's name in engine leases, stable across restarts so "
        "a restarted replica takes its engines back at once (default: "
        "cp-<hostname>-<port>)",
    )
    serve.add_argument(
        "--migrate", action="store_true", help="run the migrations at start (always on for SQLite)"
    )
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="upgrade the database to the latest schema")
    migrate.add_argument("--database-url", **database)
    migrate.set_defaults(func=_migrate)


def _database_url(value: str) -> str:
    return value or sqlite_url(DEFAULT_SQLITE.expanduser())


def _serve(args: argparse.Namespace) -> int:
    from control_plane.server import NotMigratedError, serve_control_plane

    url = _database_url(args.database_url)
    try:
        check_admin_token(args.admin_token)
        config = ControlPlaneConfig(
            database_url=url,
            admin_token=args.admin_token,
            adapter_roots=environment.adapter_roots(args.adapter_root),
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            default_max_adapters=args.default_max_adapters,
            default_max_lora_rank=args.default_max_lora_rank,
            auto_migrate=args.migrate or url.startswith("sqlite"),
            reconciler=ReconcilerConfig(
                interval_s=args.reconcile_interval,
                heartbeat_timeout_s=args.heartbeat_timeout,
                **_replica_id(args),
            ),
            shutdown_grace_s=args.shutdown_grace,
        )
        asyncio.run(serve_control_plane(config))
    except (ValueError, NotMigratedError, RuntimeError, OSError) as exc:  # a port taken
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _replica_id(args: argparse.Namespace) -> dict[str, str]:
    """`{"owner": ...}` for ReconcilerConfig, or nothing (a random id) on port 0."""
    if args.replica_id:
        return {"owner": args.replica_id}
    if not args.port:
        return {}
    return {"owner": f"cp-{socket.gethostname()[:40]}-{args.port}"}


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

    def command(
        parent: argparse._SubParsersAction, name: str, run: Command, help_text: str
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text)
        parser.add_argument(
            "--target", default=environment.control_plane(f"127.0.0.1:{ControlPlaneConfig.port}")
        )
        parser.add_argument("--admin-token", default=environment.admin_token())
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
    p = command(
        adapters,
        "resolve",
        _adapters_resolve,
        "which version a name means now and which engines serve it",
    )
    p.add_argument("adapter", help="tenant/name or tenant/name@version")

    engines = group("engines", "list engines")
    command(engines, "list", _engines_list, "list engines and their state")


Command = Callable[[AdminClient, argparse.Namespace], str]


def _call(args: argparse.Namespace, run: Command) -> int:
    with AdminClient(args.target, admin_token=args.admin_token, timeout=60) as admin:
        try:
            print(run(admin, args))
        except LoraplexError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def _tenants_create(admin: AdminClient, a: argparse.Namespace) -> str:
    return tables.tenants([admin.create_tenant(a.name, max_adapters=a.max_adapters)])


def _tenants_list(admin: AdminClient, a: argparse.Namespace) -> str:
    return tables.tenants(admin.list_tenants())


def _tenants_disable(admin: AdminClient, a: argparse.Namespace) -> str:
    return tables.tenants([admin.disable_tenant(a.name)])


def _keys_create(admin: AdminClient, a: argparse.Namespace) -> str:
    key = admin.create_api_key(a.tenant)
    return (
        f"key id:  {key.key_id}\ntenant:  {key.tenant}\napi key: {key.api_key}\n"
        "Store the API key now: it is not shown again."
    )


def _keys_revoke(admin: AdminClient, a: argparse.Namespace) -> str:
    return tables.keys([admin.revoke_api_key(a.key_id)])


def _keys_list(admin: AdminClient, a: argparse.Namespace) -> str:
    return tables.keys(admin.list_api_keys(a.tenant))


def _models_register(admin: AdminClient, a: argparse.Namespace) -> str:
    path = Path(a.path).expanduser().resolve()
    return tables.base_models(
        [admin.register_base_model(a.name, path, max_lora_rank=a.max_lora_rank)]
    )


def _models_list(admin: AdminClient, a: argparse.Namespace) -> str:
    return tables.base_models(admin.list_base_models())


def _adapters_register(admin: AdminClient, a: argparse.Namespace) -> str:
    uri = a.uri if "://" in a.uri else str(Path(a.uri).expanduser().resolve())
    return tables.versions(
        [
            admin.register_adapter(
                a.tenant, a.name, uri, base_model=a.base_model, sha256=a.sha256, replicas=a.replicas
            )
        ]
    )


def _adapters_list(admin: AdminClient, a: argparse.Namespace) -> str:
    return tables.adapters(admin.list_adapters(a.tenant))


def _adapters_retire(admin: AdminClient, a: argparse.Namespace) -> str:
    result = admin.retire_adapter(a.tenant, a.name, version=a.version)
    if not result.retired:
        return "nothing to retire: those versions were already retired"
    return tables.versions(result.retired)


def _adapters_resolve(admin: AdminClient, a: argparse.Namespace) -> str:
    found = admin.resolve_adapter(a.adapter)
    return (
        f"adapter:   {found.adapter_id}\nbase model: {found.base_model}\n"
        f"served by: {', '.join(found.endpoints) or 'no live engine yet'}"
    )


def _engines_list(admin: AdminClient, a: argparse.Namespace) -> str:
    return tables.engines(admin.list_engines())
