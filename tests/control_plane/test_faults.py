"""Faults under a serving control plane (in-process, real Postgres, real engines):
adapter files tampered with after registration, Postgres restarted, and a stop that
must always finish and leave no database work behind.

The faults that need real processes (SIGTERM, SIGKILL) are in test_process_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from control_plane.db import make_db_engine
from control_plane.server import start_control_plane
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import inference_pb2
from tests.control_plane.cp_harness import BackgroundLoop, ControlPlaneHandle, running_control_plane
from tests.control_plane.private_postgres import PrivatePostgres, private_postgres  # noqa: F401
from tests.control_plane.rpc_helpers import code_of
from tests.control_plane.test_reconciler import (
    cp_config,
    engine_config,
    held,
    register,
    registered,
    wait_for,
)
from tests.engine_server import RunningEngine, running_engine


@pytest.fixture
def cp(clean_db: str, adapter_root: Path) -> Iterator[ControlPlaneHandle]:
    # Refusals back off 0.25 s, then 0.5 s (the cap); the fourth in a row is final.
    config = cp_config(
        clean_db, adapter_root, retry_base_s=0.25, retry_cap_s=0.5, fail_after_attempts=4
    )
    with running_control_plane(config) as handle:
        handle.client().CreateTenant(pb.CreateTenantRequest(name="acme"))
        yield handle


def copy_adapter(source: Path, adapter_root: Path) -> Path:
    """A private copy under the adapter root, free to be tampered with."""
    return Path(shutil.copytree(source, adapter_root / f"{source.name}-{uuid.uuid4().hex[:8]}"))


def version_of(cp: ControlPlaneHandle, name: str) -> pb.AdapterVersion:
    [version] = cp.client().GetAdapter(pb.GetAdapterRequest(tenant="acme", name=name)).versions
    return version


def failed(cp: ControlPlaneHandle, name: str) -> pb.AdapterVersion | None:
    version = version_of(cp, name)
    return version if version.state == pb.ADAPTER_STATE_FAILED else None


def generates(engine: RunningEngine, adapter: str, api_key: str) -> bool:
    request = inference_pb2.GenerateRequest(
        adapter=adapter, text="Hello there",
        sampling=inference_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True),
    )  # fmt: skip
    try:
        result = engine.generate(request, metadata=(("authorization", f"Bearer {api_key}"),))
    except grpc.RpcError:
        return False
    return result.completion_tokens == 4


def answers(admin: Any) -> bool:
    try:
        admin.ListTenants(pb.ListTenantsRequest(), timeout=5)
    except grpc.RpcError:
        return False
    return True


def sessions_of(engine: Any) -> int:
    """Database sessions on the test database other than this one."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        )


def placement_of(url: str, name: str) -> dict[str, Any] | None:
    engine = make_db_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT p.attempts, p.last_error, p.permanent_failure, p.next_retry_at,"
                    " p.updated_at FROM placements p JOIN adapter_versions v ON v.id ="
                    " p.version_id JOIN adapters a ON a.id = v.adapter_id WHERE a.name = :n"
                ),
                {"n": name},
            ).one_or_none()
    finally:
        engine.dispose()
    return None if row is None else dict(row._mapping)


def test_a_config_rewritten_after_registration_is_refused_and_recorded(
    cp: ControlPlaneHandle, base_dir: Path, adapter_root: Path, good_adapter: Path,
    other_adapter: Path,
) -> None:  # fmt: skip
    registered(cp, base_dir)
    key = cp.client().CreateApiKey(pb.CreateApiKeyRequest(tenant="acme")).api_key
    pinned = copy_adapter(good_adapter, adapter_root)
    register(cp, "pinned", pinned)
    register(cp, "steady", other_adapter)
    config = json.loads((pinned / "adapter_config.json").read_text())
    config["lora_alpha"] = 1e30  # the weights stay: only the scaling turns to garbage
    (pinned / "adapter_config.json").write_text(json.dumps(config))
    with running_engine(engine_config(base_dir, adapter_root, cp)) as engine:
        version = wait_for(lambda: failed(cp, "pinned"), 20, "the rewritten version failed")
        assert version.failure_reason.startswith("FAILED_PRECONDITION")
        assert "adapter_config.json changed since registration" in version.failure_reason
        assert "acme/pinned@1" not in held(engine)
        # Every other adapter keeps serving.
        wait_for(lambda: generates(engine, "acme/steady", key), 10, "acme/steady to serve")


def test_a_deleted_or_corrupted_file_fails_with_its_reason_and_retries_back_off(
    cp: ControlPlaneHandle, clean_db: str, base_dir: Path, adapter_root: Path,
    good_adapter: Path, other_adapter: Path,
) -> None:  # fmt: skip
    registered(cp, base_dir)
    key = cp.client().CreateApiKey(pb.CreateApiKeyRequest(tenant="acme")).api_key
    deleted = copy_adapter(good_adapter, adapter_root)
    corrupted = copy_adapter(good_adapter, adapter_root)
    register(cp, "deleted", deleted)
    register(cp, "corrupted", corrupted)
    register(cp, "steady", other_adapter)
    (deleted / "adapter_model.safetensors").unlink()
    weights = corrupted / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # tensor bytes zeroed: the header still parses
    weights.write_bytes(bytes(data))
    # attempts -> (next_retry_at, bounds of when that refusal was recorded)
    seen: dict[int, tuple[datetime, datetime, datetime]] = {}
    reasons: set[str] = set()
    with running_engine(engine_config(base_dir, adapter_root, cp)) as engine:
        deadline = time.monotonic() + 30
        previous = datetime.now(UTC)
        while failed(cp, "deleted") is None and time.monotonic() < deadline:
            started = datetime.now(UTC)
            row = placement_of(clean_db, "deleted")
            if row is not None and row["next_retry_at"] and row["attempts"] not in seen:
                # Recorded after the poll before this one began (less the moments
                # between reading the clock and committing), before this one ended.
                seen[row["attempts"]] = (row["next_retry_at"], previous, datetime.now(UTC))
                reasons.add(row["last_error"])
            previous = started
            time.sleep(0.02)
        version = failed(cp, "deleted")
        assert version is not None, "the version with a deleted file was not marked failed"
        assert "NOT_FOUND" in version.failure_reason  # the engine's code for a missing file
        assert "adapter_model.safetensors" in version.failure_reason
        # Exponential from 0.25 s, capped at 0.5 s; the fourth refusal in a row is final.
        expected = {1: 0.25, 2: 0.5, 3: 0.5}
        assert set(expected) <= set(seen), seen
        slack = timedelta(milliseconds=100)
        for attempts, delay in expected.items():
            retry_at, earliest, latest = seen[attempts]
            shortest, longest = retry_at - latest, retry_at - earliest + slack
            assert shortest <= timedelta(seconds=delay) <= longest, (attempts, seen)
        version = wait_for(lambda: failed(cp, "corrupted"), 10, "the corrupted version failed")
        assert version.failure_reason.startswith("FAILED_PRECONDITION")
        assert "changed since it was registered" in version.failure_reason
        # The engine checked the digest registered for parallel checking, not one pass.
        assert "chunked sha256" in version.failure_reason
        # While it backed off, its placement said why each load failed.
        [reason] = reasons
        assert reason.startswith("NOT_FOUND") and "adapter_model.safetensors" in reason
        wait_for(lambda: generates(engine, "acme/steady", key), 10, "acme/steady to serve")
        time.sleep(1.0)  # a few more passes: the engine is not asked again
        assert refusals(cp, "NOT_FOUND") == 4
        assert set(held(engine)) == {"acme/steady@1"}


def refusals(cp: ControlPlaneHandle, code: str) -> float:
    """LoadAdapter calls the engines answered with `code`, by the control plane's count."""
    name = "loraplex_control_plane_adapter_loads_total"
    return cp.running.metrics.registry.get_sample_value(name, {"outcome": code}) or 0.0


def test_postgres_restarted_under_a_serving_control_plane(
    private_postgres: PrivatePostgres,  # noqa: F811
    adapter_root: Path,
) -> None:
    config = cp_config(private_postgres.url, adapter_root)
    with running_control_plane(config) as cp:
        admin = cp.client()
        admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
        key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme")).api_key
        tenant = cp.client(key)
        private_postgres.stop("fast")  # ends every connection the pool holds
        calls = [
            (admin.ListTenants, pb.ListTenantsRequest()),
            (admin.CreateTenant, pb.CreateTenantRequest(name="globex")),
            (tenant.ResolveAdapter, pb.ResolveAdapterRequest(adapter="acme/none")),
        ]
        for call, request in calls:
            code, details = code_of(call, request)
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert "database" in details and "retry" in details
        private_postgres.start()
        # No restart of the control plane: its pool reconnects on the next call.
        wait_for(lambda: answers(admin), 15, "the control plane to answer again")
        admin.CreateTenant(pb.CreateTenantRequest(name="globex"))
        names = [t.name for t in admin.ListTenants(pb.ListTenantsRequest()).tenants]
        assert names == ["acme", "globex"]
        code, _ = code_of(tenant.ResolveAdapter, pb.ResolveAdapterRequest(adapter="acme/none"))
        assert code == grpc.StatusCode.NOT_FOUND  # the key checked out: only the adapter is missing
        assert cp.reconcile().engines_reached == 0  # the reconciler's passes run again


async def _nudge_then_stop(running: Any, spins: int) -> float:
    await asyncio.sleep(0.3)  # the first pass is over: the loops wait for a wake-up
    running.reconciler.nudge()
    for _ in range(spins):  # lands the stop at every point of the wake-up
        await asyncio.sleep(0)
    started = time.monotonic()
    await running.stop(grace=0.5)
    return time.monotonic() - started


def test_stop_right_after_a_nudge_finishes_and_leaves_no_database_work(
    clean_db: str, adapter_root: Path
) -> None:
    # asyncio.wait_for on Python 3.11 swallowed a stop that landed as a nudge woke the
    # loop: stop() hung and the reconciler went on running passes into the next test.
    config = cp_config(clean_db, adapter_root, interval_s=60)
    engine = make_db_engine(clean_db)
    try:
        for attempt in range(12):
            background = BackgroundLoop()
            try:
                running = background.run(start_control_plane(config))
                took = background.run(_nudge_then_stop(running, attempt % 4), timeout=20)
            finally:
                background.close()
            assert took < 10
            # Sessions close a moment after the pool lets go of them, never to reopen.
            wait_for(lambda: sessions_of(engine) == 0, 5, "the control plane's sessions to end")
    finally:
        engine.dispose()
