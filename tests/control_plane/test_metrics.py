"""The control plane's Prometheus metrics over HTTP against real Postgres and a real
engine: fleet gauges by state, reconciler passes, loads/evictions/key syncs by outcome,
RPC errors by method and code; and the fleet gauges' cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from sqlalchemy.orm import Session, sessionmaker

from control_plane.metrics import ControlPlaneMetrics
from control_plane.models import Tenant
from loraplex.v1 import control_plane_pb2 as pb
from tests.control_plane.cp_harness import running_control_plane
from tests.control_plane.test_reconciler import (
    BASE,
    cp_config,
    engine_config,
    held,
    registered,
    wait_for,
)
from tests.engine_server import running_engine
from tests.metrics_scrape import Samples, render, scrape, value
from tests.ports import free_port

CP = "loraplex_control_plane_"


def scrape_until(port: int, check: Callable[[Samples], bool], what: str) -> Samples:
    found: list[Samples] = []

    def passes() -> bool:
        found[:] = [scrape(port)]
        return check(found[0])

    wait_for(passes, 10, what)
    return found[0]


def test_scraped_fleet_reconciler_and_rpc_error_metrics(
    clean_db: str, base_dir: Path, adapter_root: Path, good_adapter: Path, other_adapter: Path
) -> None:
    port = free_port()
    config = replace(cp_config(clean_db, adapter_root), metrics_port=port, metrics_cache_s=0)

    def adapter(name: str, folder: Path) -> pb.RegisterAdapterRequest:
        return pb.RegisterAdapterRequest(tenant="acme", name=name, uri=str(folder), base_model=BASE)

    with running_control_plane(config) as cp:
        admin = cp.client()
        admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
        admin.CreateTenant(pb.CreateTenantRequest(name="globex"))
        admin.DisableTenant(pb.DisableTenantRequest(name="globex"))
        with pytest.raises(grpc.RpcError) as caught:
            admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as caught:
            cp.client(token="wrong").ListTenants(pb.ListTenantsRequest())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        registered(cp, base_dir)

        # The engine's slots take rank 4: the rank-8 adapter is refused at load.
        with running_engine(engine_config(base_dir, adapter_root, cp, max_lora_rank=4)) as engine:
            admin.RegisterAdapter(adapter("a", good_adapter))
            wait_for(lambda: held(engine) == {"acme/a@1": ("acme/a",)}, 10, "a loaded")
            placed = {"desired": "loaded", "observed": "loaded"}
            loaded = scrape_until(
                port, lambda s: value(s, CP + "placements", 0, **placed) == 1, "a placed"
            )
            admin.RegisterAdapter(adapter("b", other_adapter))
            refused = {"outcome": "FAILED_PRECONDITION"}
            scrape_until(
                port, lambda s: value(s, CP + "adapter_loads_total", 0, **refused) >= 1, "b refused"
            )
            admin.RetireAdapter(pb.RetireAdapterRequest(tenant="acme", name="a"))
            final = scrape_until(
                port,
                lambda s: value(s, CP + "adapter_evictions_total", 0, outcome="OK") == 1,
                "a evicted",
            )

    assert value(loaded, CP + "tenants", state="active") == 1
    assert value(loaded, CP + "tenants", state="disabled") == 1
    assert value(loaded, CP + "engines", state="live") == 1
    assert value(loaded, CP + "engines", state="stale") == 0
    assert value(loaded, CP + "adapter_versions", state="active") == 1
    assert value(loaded, CP + "adapter_loads_total", outcome="OK") == 1
    assert value(final, CP + "adapter_versions", state="retired") == 1
    assert value(final, CP + "key_syncs_total", outcome="OK") >= 1
    assert value(final, CP + "reconcile_pass_duration_seconds_count") >= 3
    assert value(final, CP + "reconcile_pass_failures_total") == 0
    errors = CP + "rpc_errors_total"
    assert value(final, errors, method="CreateTenant", code="ALREADY_EXISTS") == 1
    assert value(final, errors, method="ListTenants", code="UNAUTHENTICATED") == 1
    assert sum(v for (name, _), v in final.items() if name == errors) == 2


def test_fleet_gauges_are_cached_between_scrapes(sessions: sessionmaker[Session]) -> None:
    metrics = ControlPlaneMetrics()
    metrics.watch(sessions, max_age_s=60)

    def tenants() -> float:
        return value(render(metrics.registry), CP + "tenants", state="active")

    assert tenants() == 0
    with sessions.begin() as session:
        session.add(Tenant(name="acme", max_adapters=1, created_at=datetime.now(UTC)))
    assert tenants() == 0  # within max_age_s: the cached count, no new query
    fresh = ControlPlaneMetrics()
    fresh.watch(sessions, max_age_s=0)
    assert value(render(fresh.registry), CP + "tenants", state="active") == 1
