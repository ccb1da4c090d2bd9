"""Faults that need real processes: `loraplex control-plane serve` stopped with SIGTERM
(with and without its database) and killed with SIGKILL in the middle of a reconcile
pass, next to a real `loraplex engine serve` on the CPU.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from control_plane.db import make_db_engine
from loraplex.v1 import control_plane_pb2 as pb
from tests.control_plane.cp_harness import ADMIN_TOKEN, Client, Process
from tests.control_plane.private_postgres import PrivatePostgres, private_postgres  # noqa: F401
from tests.control_plane.rpc_helpers import code_of
from tests.control_plane.test_end_to_end import held
from tests.control_plane.test_reconciler import wait_for
from tests.ports import free_port

pytestmark = pytest.mark.slow


def control_plane_args(url: str, port: int, adapter_root: Path, *extra: str) -> list[str]:
    return ["control-plane", "serve", "--database-url", url, "--host", "127.0.0.1",
            "--port", str(port), "--adapter-root", str(adapter_root),
            "--reconcile-interval", "0.5", *extra]  # fmt: skip


def answers(admin: Client) -> bool:
    try:
        admin.ListTenants(pb.ListTenantsRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return True


def waiting_on_locks(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def health_status(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_sigterm_drains_calls_in_flight_and_exits_0_also_without_its_database(
    private_postgres: PrivatePostgres,  # noqa: F811
    adapter_root: Path,
    tmp_path: Path,
    processes: list[Process],
) -> None:
    port = free_port()
    args = control_plane_args(private_postgres.url, port, adapter_root, "--shutdown-grace", "30")
    control = Process(args, tmp_path / "control-plane.log").start()
    processes.append(control)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    admin = Client(channel, ADMIN_TOKEN)
    wait_for(lambda: answers(admin), 60, "the control plane to start")
    admin.CreateTenant(pb.CreateTenantRequest(name="acme"))

    # A call in flight: CreateApiKey waits on the tenant's row, which the test holds.
    outcome: dict[str, Any] = {}

    def create_key() -> None:
        try:
            outcome["key"] = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"), timeout=60)
        except grpc.RpcError as exc:
            outcome["error"] = exc

    with psycopg.connect(private_postgres.url) as lock:
        lock.execute("SELECT 1 FROM tenants WHERE name = 'acme' FOR UPDATE")
        caller = threading.Thread(target=create_key)
        caller.start()
        wait_for(lambda: waiting_on_locks(private_postgres.url) == 1, 10, "the call to wait")
        assert control.proc is not None
        control.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
                 10, "health to say NOT_SERVING")  # fmt: skip
        code, details = code_of(admin.ListTenants, pb.ListTenantsRequest())
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        time.sleep(0.5)
        assert control.proc.poll() is None, "it exited with a call in flight"
        lock.rollback()  # the call can go on now
        released = time.monotonic()
    caller.join(30)
    assert "error" not in outcome, outcome
    assert outcome["key"].tenant == "acme" and outcome["key"].api_key
    assert control.proc.wait(30) == 0, control.log.read_text()[-3000:]
    assert time.monotonic() - released < 15  # it went once the call ended, not at the grace

    # Again with the database gone: a clean exit, not a traceback and a server left up.
    control = Process(args, tmp_path / "control-plane-2.log").start()
    processes.append(control)
    wait_for(lambda: answers(admin), 60, "the control plane to start again")
    assert [t.name for t in admin.ListTenants(pb.ListTenantsRequest()).tenants] == ["acme"]
    private_postgres.stop("immediate")
    assert code_of(admin.ListTenants, pb.ListTenantsRequest())[0] == grpc.StatusCode.UNAVAILABLE
    assert control.proc is not None
    stopped = time.monotonic()
    control.proc.send_signal(signal.SIGTERM)
    assert control.proc.wait(30) == 0, control.log.read_text()[-3000:]
    assert time.monotonic() - stopped < 20
    channel.close()


def test_killed_during_a_reconcile_and_restarted_loses_nothing(
    clean_db: str, base_dir: Path, adapter_root: Path, good_adapter: Path,
    other_adapter: Path, tmp_path: Path, processes: list[Process],
) -> None:  # fmt: skip
    cp_port, engine_port = free_port(), free_port()
    address = f"127.0.0.1:{engine_port}"
    cp_args = control_plane_args(clean_db, cp_port, adapter_root, "--heartbeat-timeout", "10")
    control = Process(cp_args, tmp_path / "control-plane.log").start()
    processes.append(control)
    channel = grpc.insecure_channel(f"127.0.0.1:{cp_port}")
    admin = Client(channel, ADMIN_TOKEN)
    wait_for(lambda: answers(admin), 60, "the control plane to start")
    admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
    admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", path=str(base_dir)))
    engine = Process(
        ["engine", "serve", "--model", str(base_dir), "--host", "127.0.0.1",
         "--port", str(engine_port), "--device", "cpu", "--kv-cache-tokens", "1024",
         "--max-lora-rank", "16", "--control-plane", f"127.0.0.1:{cp_port}",
         "--advertise", address, "--adapter-root", str(adapter_root)],
        tmp_path / "engine.log",
    ).start()  # fmt: skip
    processes.append(engine)

    def register(name: str, folder: Path) -> pb.AdapterVersion:
        return admin.RegisterAdapter(pb.RegisterAdapterRequest(
            tenant="acme", name=name, uri=str(folder), base_model="tiny"))  # fmt: skip

    register("a", good_adapter)
    wait_for(lambda: _held(address) == {"acme/a@1"}, 90, "acme/a on the engine")
    db = make_db_engine(clean_db)
    try:
        # Freeze the engine: the pass the next changes start waits on it, and the
        # control plane is killed in the middle of that pass.
        assert engine.proc is not None
        engine.proc.send_signal(signal.SIGSTOP)
        try:
            register("b", other_adapter)
            admin.RetireAdapter(pb.RetireAdapterRequest(tenant="acme", name="a"))
            time.sleep(1.5)
            with db.connect() as conn:
                lease_until = conn.execute(text("SELECT lease_until FROM engines")).scalar_one()
            # Leased for long: a new replica under another name would wait this out.
            assert lease_until - datetime.now(UTC) > timedelta(seconds=30)
            control.kill()
        finally:
            engine.proc.send_signal(signal.SIGCONT)
        control = Process(cp_args, tmp_path / "control-plane-2.log").start()
        processes.append(control)
        wait_for(lambda: answers(admin), 60, "the control plane to start again")
        wait_for(lambda: _held(address) == {"acme/b@1"}, 20, "the pass to complete")
        # A client that never heard back registers again: the same version, not a second.
        assert register("b", other_adapter).version == 1
        listed = {
            a.name: [(v.version, v.state) for v in a.versions]
            for a in admin.ListAdapters(pb.ListTenantAdaptersRequest()).adapters
        }
        assert listed == {"a": [(1, pb.ADAPTER_STATE_RETIRED)], "b": [(1, pb.ADAPTER_STATE_ACTIVE)]}
        with db.connect() as conn:
            rows = conn.execute(text(
                "SELECT a.name, v.number, p.desired_state, p.observed_state FROM placements p"
                " JOIN adapter_versions v ON v.id = p.version_id"
                " JOIN adapters a ON a.id = v.adapter_id"
            )).all()  # fmt: skip
        assert [tuple(r) for r in rows] == [("b", 1, "loaded", "loaded")]
        # Served there once the engine's heartbeats reach the new process again.
        resolve = pb.ResolveAdapterRequest(adapter="acme/b")
        wait_for(lambda: list(admin.ResolveAdapter(resolve).endpoints) == [address], 30,
                 "acme/b resolved to the engine")  # fmt: skip
    finally:
        db.dispose()
        channel.close()


def _held(address: str) -> set[str]:
    try:
        return held(address)
    except grpc.RpcError:
        return set()
