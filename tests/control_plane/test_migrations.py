"""Migrations: up from empty, down to base and up again, and models == migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from control_plane import migrate
from control_plane.config import ControlPlaneConfig
from control_plane.db import make_db_engine, sqlite_url
from control_plane.models import Base
from control_plane.reconciler.config import ReconcilerConfig
from control_plane.server import NotMigratedError, start_control_plane
from loraplex.v1 import control_plane_pb2 as pb
from tests.control_plane.conftest import create_database, drop_database
from tests.control_plane.cp_harness import ADMIN_TOKEN, BackgroundLoop, running_control_plane


def tables(url: str) -> set[str]:
    engine = make_db_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.fixture
def empty_postgres() -> str:
    url = create_database()
    yield url
    drop_database(url)


def test_postgres_up_down_up_and_check(empty_postgres: str) -> None:
    url = empty_postgres
    assert not migrate.is_up_to_date(url)
    migrate.upgrade(url)
    assert tables(url) == set(Base.metadata.tables)
    migrate.check(url)  # raises if the models and the migrations disagree
    migrate.downgrade(url, "base")
    assert tables(url) == set()
    migrate.upgrade(url)
    migrate.check(url)
    assert migrate.is_up_to_date(url)


def test_sqlite_up_down_up_and_check(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "nested" / "cp.db")
    migrate.upgrade(url)
    migrate.check(url)
    migrate.downgrade(url, "base")
    assert tables(url) == set()
    migrate.upgrade(url)
    assert tables(url) == set(Base.metadata.tables)


def test_serving_refuses_an_unmigrated_database(empty_postgres: str) -> None:
    background = BackgroundLoop()
    try:
        config = ControlPlaneConfig(database_url=empty_postgres, admin_token="t", port=0)
        with pytest.raises(NotMigratedError, match="migrate"):
            background.run(start_control_plane(config))
    finally:
        background.close()


def test_sqlite_embedded_default_smoke(
    tmp_path: Path, base_dir: Path, good_adapter: Path, adapter_root: Path
) -> None:
    """The embedded default: migrated at start, then the same RPCs work on SQLite."""
    config = ControlPlaneConfig(
        database_url=sqlite_url(tmp_path / "cp.db"),
        admin_token=ADMIN_TOKEN,
        adapter_roots=(adapter_root,),
        host="127.0.0.1",
        port=0,
        auto_migrate=True,
        reconciler=ReconcilerConfig(interval_s=0.2),
    )
    with running_control_plane(config) as cp:
        admin = cp.client()
        admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
        admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
        admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", path=str(base_dir)))
        version = admin.RegisterAdapter(
            pb.RegisterAdapterRequest(
                tenant="acme", name="a", uri=str(good_adapter), base_model="tiny"
            )
        )
        assert version.version == 1
        cp.reconcile()
        retired = admin.RetireAdapter(pb.RetireAdapterRequest(tenant="acme", name="a"))
        assert retired.adapter.current_version == 0
    with running_control_plane(config) as cp:  # restart: nothing lost
        tenants = cp.client().ListTenants(pb.ListTenantsRequest()).tenants
        assert [(t.name, t.num_adapters, t.num_active_keys) for t in tenants] == [("acme", 1, 1)]
