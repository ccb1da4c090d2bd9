"""The embedded SQLite default: a transaction's reads and writes are atomic, so
concurrent registrations serialize as they do on Postgres."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import text

from control_plane.config import ControlPlaneConfig
from control_plane.db import make_db_engine, make_session_factory, sqlite_url
from control_plane.reconciler.config import ReconcilerConfig
from loraplex.v1 import control_plane_pb2 as pb
from tests.control_plane.cp_harness import ADMIN_TOKEN, running_control_plane
from tests.control_plane.rpc_helpers import BASE, register


def test_a_read_then_write_transaction_loses_no_update(tmp_path: Path) -> None:
    """Each transaction reads a counter, waits, writes it plus one: only if the read is
    inside the transaction (holding the write lock) do all increments survive."""
    engine = make_db_engine(sqlite_url(tmp_path / "counter.db"))
    sessions = make_session_factory(engine)
    try:
        with sessions.begin() as session:
            session.execute(text("CREATE TABLE counter (value INTEGER NOT NULL)"))
            session.execute(text("INSERT INTO counter VALUES (0)"))

        def increment(_: int) -> None:
            with sessions.begin() as session:
                value = session.execute(text("SELECT value FROM counter")).scalar_one()
                time.sleep(0.05)  # another transaction would read the same value here
                session.execute(text("UPDATE counter SET value = :v"), {"v": value + 1})

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(increment, range(8)))
        with sessions.begin() as session:
            assert session.execute(text("SELECT value FROM counter")).scalar_one() == 8
    finally:
        engine.dispose()


def test_concurrent_registrations_on_sqlite_make_one_version(
    tmp_path: Path, base_dir: Path, adapter_root: Path, good_adapter: Path
) -> None:
    config = ControlPlaneConfig(
        database_url=sqlite_url(tmp_path / "cp.db"),
        admin_token=ADMIN_TOKEN,
        adapter_roots=(adapter_root,),
        host="127.0.0.1",
        port=0,
        auto_migrate=True,
        default_max_lora_rank=16,
        reconciler=ReconcilerConfig(interval_s=60),
    )
    with running_control_plane(config) as cp:
        admin = cp.client()
        admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
        admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=BASE, path=str(base_dir)))
        with ThreadPoolExecutor(6) as pool:
            versions = list(pool.map(lambda _: register(admin, "a", good_adapter), range(6)))
        assert {(v.adapter_id, v.current) for v in versions} == {("acme/a@1", True)}
        adapter = admin.GetAdapter(pb.GetAdapterRequest(tenant="acme", name="a"))
        assert [v.version for v in adapter.versions] == [1]
