"""Real servers for the SDK tests: an engine with the tiny Llama, a real PEFT adapter
and two tenants' keys; the control-plane fixtures (real Postgres) of tests/control_plane.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from engine.config import EngineConfig
from loraplex.client import AdminClient
from loraplex.keys import hash_secret, new_key
from loraplex.v1 import engine_admin_pb2 as admin_pb
from tests.adapter_factory import make_peft_adapter
from tests.control_plane import conftest as control_plane_fixtures
from tests.control_plane.cp_harness import ADMIN_TOKEN, ControlPlaneHandle, running_control_plane
from tests.control_plane.test_reconciler import cp_config
from tests.engine_server import RunningEngine, running_engine
from tests.metrics_scrape import render, value

T = TypeVar("T")
# The control-plane tests' fixtures: real Postgres, the tiny base model, PEFT adapters.
database_url = control_plane_fixtures.database_url
clean_db = control_plane_fixtures.clean_db
base_dir = control_plane_fixtures.base_dir
adapter_root = control_plane_fixtures.adapter_root
good_adapter = control_plane_fixtures.good_adapter
other_adapter = control_plane_fixtures.other_adapter
wrong_hidden_adapter = control_plane_fixtures.wrong_hidden_adapter
ADAPTER = "acme/support"  # alias of the loaded version acme/support@1


@dataclass
class ServedEngine:
    running: RunningEngine
    keys: dict[str, str]  # tenant -> API key

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def num_requests(self) -> int:
        """Requests the engine holds (running or waiting)."""
        scheduler = self.running.parts.engine.scheduler
        return scheduler.num_running + scheduler.num_waiting

    def num_cancelled(self, tenant: str = "acme") -> float:
        """Requests of `tenant` the engine ended as cancelled (its own metric)."""
        samples = render(self.running.parts.metrics.registry)
        return value(samples, "loraplex_engine_requests_finished_total", 0.0, tenant=tenant,
                     reason="cancelled")  # fmt: skip


def engine_config(model_path: Path, adapter_folder: Path, **overrides: object) -> EngineConfig:
    values: dict[str, object] = dict(
        model_path=model_path, port=0, kv_cache_tokens=2048, adapter_roots=(adapter_folder,),
        key_table_ttl_s=3600.0,
    )  # fmt: skip
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


def serve_tenants(running: RunningEngine, adapter_folder: Path) -> dict[str, str]:
    """Pushes acme's and globex's keys and loads acme's adapter; the keys by tenant."""
    keys = {tenant: new_key() for tenant in ("acme", "globex")}
    entries = [
        admin_pb.ApiKeyEntry(key_id=key_id, secret_hash=hash_secret(secret), tenant=tenant)
        for tenant, (key_id, secret, _) in keys.items()
    ]
    running.admin.SyncApiKeys(admin_pb.SyncApiKeysRequest(generation=1, keys=entries))
    running.admin.LoadAdapter(
        admin_pb.LoadAdapterRequest(
            adapter_id=f"{ADAPTER}@1", path=str(adapter_folder), tenant="acme", aliases=[ADAPTER]
        )
    )
    return {tenant: api_key for tenant, (_, _, api_key) in keys.items()}


@pytest.fixture(scope="session")
def support_adapter(tiny_llama31_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(
        tiny_llama31_path, tmp_path_factory.mktemp("sdk-adapters") / "support", r=4, alpha=8,
        target_modules=["q_proj", "v_proj"], seed=11,
    )  # fmt: skip


@pytest.fixture(scope="module")
def served(tiny_llama31_path: Path, support_adapter: Path) -> Iterator[ServedEngine]:
    """One engine per test module, with tenants acme (owning acme/support) and globex."""
    config = engine_config(tiny_llama31_path, support_adapter.parent)
    with running_engine(config) as running:
        yield ServedEngine(running, serve_tenants(running, support_adapter))


@pytest.fixture
def cp(clean_db: str, adapter_root: Path) -> Iterator[ControlPlaneHandle]:
    """A control plane on an empty Postgres database, reconciling every 0.3 s."""
    with running_control_plane(cp_config(clean_db, adapter_root)) as handle:
        yield handle


@pytest.fixture
def admin(cp: ControlPlaneHandle) -> Iterator[AdminClient]:
    with AdminClient(cp.address, admin_token=ADMIN_TOKEN) as client:
        yield client


def wait_for(check: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return value
