"""How fast changes reach engines: nudges instead of intervals, key pushes that never
wait for a slow Load, and leases that outlive a long pass.

A slow engine here is an in-process EngineAdmin whose LoadAdapter sleeps, joined to the
control plane through the real control link.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from sqlalchemy.orm import Session, sessionmaker

from control_plane.reconciler.config import ReconcilerConfig
from control_plane.repositories.fleet import EngineRepository
from engine.server.auth import ApiKeyTable, AuthError
from engine.server.control_link import ControlLinkConfig, run_control_link
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import engine_admin_pb2_grpc as admin_grpc
from tests.control_plane.cp_harness import (
    ADMIN_TOKEN,
    BackgroundLoop,
    ControlPlaneHandle,
    running_control_plane,
)
from tests.control_plane.test_reconciler import (
    cp_config,
    engine_config,
    held,
    register,
    registered,
    wait_for,
)
from tests.engine_server import running_engine


class SlowEngine(admin_grpc.EngineAdminServicer):
    """Holds nothing, takes key tables, and sleeps `load_s` in every LoadAdapter."""

    def __init__(self, load_s: float) -> None:
        self.load_s = load_s
        self.keys = ApiKeyTable(enforcing=True)
        self.loads_started = 0

    async def LoadAdapter(self, request, context):  # noqa: ANN001, ANN201, N802
        self.loads_started += 1
        await asyncio.sleep(self.load_s)
        return admin_pb.LoadAdapterResponse(outcome=admin_pb.LOAD_OUTCOME_LOADED)

    async def EvictAdapter(self, request, context):  # noqa: ANN001, ANN201, N802
        return admin_pb.EvictAdapterResponse(outcome=admin_pb.EVICT_OUTCOME_NOT_PRESENT)

    async def ListAdapters(self, request, context):  # noqa: ANN001, ANN201, N802
        return admin_pb.ListAdaptersResponse()

    async def SyncApiKeys(self, request, context):  # noqa: ANN001, ANN201, N802
        return admin_pb.SyncApiKeysResponse(
            generation=self.keys.sync(request.keys, request.generation)
        )


@contextmanager
def slow_engine(cp: ControlPlaneHandle, load_s: float) -> Iterator[SlowEngine]:
    """A SlowEngine of the registered base model, registered and heartbeating."""
    [model] = cp.client().ListBaseModels(pb.ListBaseModelsRequest()).base_models
    info = admin_pb.EngineInfo(
        boot_id=uuid.uuid4().hex, model_fingerprint=model.fingerprint, max_loras=4, max_lora_rank=16
    )
    fake = SlowEngine(load_s)
    background = BackgroundLoop()

    async def start() -> tuple[grpc.aio.Server, asyncio.Task[None]]:
        server = grpc.aio.server()
        admin_grpc.add_EngineAdminServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        link = ControlLinkConfig(
            control_plane=cp.address,
            advertise=f"127.0.0.1:{port}",
            admin_token=ADMIN_TOKEN,
            heartbeat_interval_s=0.5,
        )
        return server, asyncio.create_task(run_control_link(link, lambda: info, fake.keys))

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(0)

    server, task = background.run(start())
    try:
        yield fake
    finally:
        background.run(stop())
        background.close()


def accepted(keys: ApiKeyTable, api_key: str) -> bool:
    try:
        return keys.authenticate(f"Bearer {api_key}") is not None
    except AuthError:
        return False


def engines(cp: ControlPlaneHandle) -> int:
    return len(cp.client().ListEngines(pb.ListEnginesRequest()).engines)


@pytest.fixture
def cp(clean_db: str, adapter_root: Path) -> Iterator[ControlPlaneHandle]:
    """A control plane with tenant acme, reconciling every 0.3 s."""
    with running_control_plane(cp_config(clean_db, adapter_root)) as handle:
        handle.client().CreateTenant(pb.CreateTenantRequest(name="acme"))
        yield handle


def test_a_slow_load_does_not_hold_back_a_revocation(
    cp: ControlPlaneHandle, base_dir: Path, adapter_root: Path, good_adapter: Path
) -> None:
    registered(cp, base_dir)
    with (
        running_engine(engine_config(base_dir, adapter_root, cp)) as engine,
        slow_engine(cp, load_s=60) as slow,
    ):
        wait_for(lambda: engines(cp) == 2, 10, "both engines to register")
        created = cp.client().CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
        key = created.api_key
        for keys in (engine.parts.keys, slow.keys):
            wait_for(lambda keys=keys: accepted(keys, key), 5, "the key on both engines")
        register(cp, "a", good_adapter)
        wait_for(lambda: slow.loads_started, 5, "a load hanging on the slow engine")
        wait_for(lambda: "acme/a@1" in held(engine), 5, "the load on the other engine")
        start = time.monotonic()
        cp.client().RevokeApiKey(pb.RevokeApiKeyRequest(key_id=created.key_id))
        for keys in (engine.parts.keys, slow.keys):
            wait_for(lambda keys=keys: not accepted(keys, key), 5, "the revocation")
        assert time.monotonic() - start < 5


def test_changes_reach_engines_long_before_the_next_interval(
    clean_db: str, base_dir: Path, adapter_root: Path, good_adapter: Path
) -> None:
    config = cp_config(clean_db, adapter_root, interval_s=30, key_sync_interval_s=30)
    with running_control_plane(config) as cp:
        cp.client().CreateTenant(pb.CreateTenantRequest(name="acme"))
        registered(cp, base_dir)
        with running_engine(engine_config(base_dir, adapter_root, cp)) as engine:
            wait_for(lambda: engines(cp) == 1, 10, "the engine to register")
            created = cp.client().CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
            wait_for(lambda: accepted(engine.parts.keys, created.api_key), 3, "the key")
            register(cp, "a", good_adapter)
            wait_for(lambda: "acme/a@1" in held(engine), 3, "the adapter")
            cp.client().RevokeApiKey(pb.RevokeApiKeyRequest(key_id=created.key_id))
            wait_for(lambda: not accepted(engine.parts.keys, created.api_key), 3, "revocation")


def test_a_pass_longer_than_the_lease_keeps_its_engines(
    clean_db: str,
    base_dir: Path,
    adapter_root: Path,
    good_adapter: Path,
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every pass loads six adapters at 0.4 s each (the slow engine never holds them):
    # 2.4 seconds, longer than the 2 s lease. Renewals keep the lease, and no call is
    # held back for fear that it would outlive it.
    config = cp_config(clean_db, adapter_root, lease_s=2.0, load_timeout_s=0.5, rpc_timeout_s=0.5)
    with running_control_plane(config) as cp:
        cp.client().CreateTenant(pb.CreateTenantRequest(name="acme"))
        registered(cp, base_dir)
        with slow_engine(cp, load_s=0.4) as slow:
            wait_for(lambda: engines(cp) == 1, 10, "the engine to register")
            for name in "abcdef":
                register(cp, name, good_adapter)
            wait_for(lambda: slow.loads_started >= 6, 10, "a long pass under way")
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                with sessions() as session:  # another replica tries; rolled back
                    now = datetime.now(UTC)
                    taken = EngineRepository(session).claim("intruder", now, now)
                    assert taken == [], "the lease lapsed during a pass"
                time.sleep(0.05)
            assert slow.loads_started >= 12
    assert not [r for r in caplog.records if "could lapse" in r.getMessage()]


def test_the_lease_must_outlive_the_longest_call() -> None:
    config = ReconcilerConfig()
    assert config.lease_s >= 2 * config.load_timeout_s
    with pytest.raises(ValueError, match="lease_s"):
        ReconcilerConfig(lease_s=30, load_timeout_s=120)
    with pytest.raises(ValueError, match="lease_s"):
        ReconcilerConfig(lease_s=15, rpc_timeout_s=10)
