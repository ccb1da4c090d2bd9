"""Real Postgres for the control-plane tests: one fresh database per test session.

The server is `LORAPLEX_TEST_POSTGRES_URL` (default: postgres@127.0.0.1:5432, trust
auth); a database `loraplex_test_<random>` is created, migrated, and dropped at the end.
Tiny real models and real PEFT adapters are made once per session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from control_plane import migrate
from control_plane.config import ControlPlaneConfig
from control_plane.db import make_db_engine, make_session_factory
from control_plane.reconciler.config import ReconcilerConfig
from loraplex.v1 import control_plane_pb2 as pb
from tests.adapter_factory import make_peft_adapter, make_tiny_llama
from tests.control_plane.cp_harness import (
    ADMIN_TOKEN,
    Client,
    ControlPlaneHandle,
    Process,
    running_control_plane,
)
from tests.model_factory import make_tiny_model

SERVER_URL = os.environ.get("LORAPLEX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
_TABLES = (
    "audit_events",
    "placements",
    "engines",
    "api_keys",
    "adapter_versions",
    "adapters",
    "base_models",
    "tenants",
)


def create_database() -> str:
    """Create an empty database on the test server; its SQLAlchemy URL."""
    name = f"loraplex_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{SERVER_URL}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{SERVER_URL}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(f"{SERVER_URL}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = create_database()
    migrate.upgrade(url)
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def clean_db(database_url: str) -> str:
    """The session database, emptied: every test starts from a migrated, empty schema."""
    engine = make_db_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(_TABLES)} RESTART IDENTITY CASCADE"))
            conn.execute(text("UPDATE counters SET value = 1"))
    finally:
        engine.dispose()
    return database_url


@pytest.fixture
def db_engine(clean_db: str) -> Iterator[Engine]:
    engine = make_db_engine(clean_db)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(db_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(db_engine)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 64, 2 layers, SmolLM2 tokenizer) that engines can serve."""
    return make_tiny_model("llama_tied", tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def good_adapter(base_dir: Path, adapter_root: Path) -> Path:
    return make_peft_adapter(
        base_dir, adapter_root / "good", r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=1
    )


@pytest.fixture(scope="session")
def other_adapter(base_dir: Path, adapter_root: Path) -> Path:
    return make_peft_adapter(
        base_dir,
        adapter_root / "other",
        r=8,
        alpha=16,
        target_modules=["q_proj", "o_proj", "down_proj"],
        seed=2,
    )


@pytest.fixture(scope="session")
def big_rank_adapter(base_dir: Path, adapter_root: Path) -> Path:
    return make_peft_adapter(
        base_dir, adapter_root / "rank32", r=32, alpha=32, target_modules=["q_proj"], seed=3
    )


@pytest.fixture(scope="session")
def wrong_hidden_adapter(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path) -> Path:
    base = make_tiny_llama(tmp_path_factory.mktemp("hidden32"), hidden_size=32)
    return make_peft_adapter(
        base, adapter_root / "hidden32", r=4, alpha=8, target_modules=["q_proj"], seed=4
    )


@pytest.fixture(scope="session")
def wrong_layers_adapter(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path) -> Path:
    base = make_tiny_llama(tmp_path_factory.mktemp("layers4"), num_hidden_layers=4)
    return make_peft_adapter(
        base, adapter_root / "layers4", r=4, alpha=8, target_modules=["q_proj"], seed=5
    )


@pytest.fixture
def cp(clean_db: str, adapter_root: Path) -> Iterator[ControlPlaneHandle]:
    """A control plane on the clean database; its reconciler idles (no engines here)."""
    config = ControlPlaneConfig(
        database_url=clean_db,
        admin_token=ADMIN_TOKEN,
        adapter_roots=(adapter_root,),
        host="127.0.0.1",
        port=0,
        default_max_lora_rank=16,
        reconciler=ReconcilerConfig(interval_s=60),
    )
    with running_control_plane(config) as handle:
        yield handle


@pytest.fixture
def admin(cp: ControlPlaneHandle) -> Client:
    return cp.client()


@pytest.fixture
def with_base(admin: Client, base_dir: Path) -> Client:
    """Tenants acme and globex and the base model "tiny" exist."""
    admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
    admin.CreateTenant(pb.CreateTenantRequest(name="globex"))
    admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", path=str(base_dir)))
    return admin


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Server processes a test starts (append them); each is killed when it ends."""
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()
