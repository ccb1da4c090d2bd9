"""API keys between the control plane and engines under stress (issue 8): a flood of
wrong secrets at ResolveAdapter, an engine that loses its control plane, a database
restored to a lower key-table generation. Real Postgres, real control plane, real
engines on the tiny model."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import grpc
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from loraplex.key_guard import GuardLimits
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import inference_pb2
from tests.control_plane.cp_harness import ControlPlaneHandle, running_control_plane
from tests.control_plane.test_reconciler import cp_config, engine_config, wait_for
from tests.engine_server import RunningEngine, running_engine
from tests.ports import free_port


def code_of(call, request) -> tuple[grpc.StatusCode, str]:  # noqa: ANN001
    try:
        call(request)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_resolve_adapter_under_a_flood_of_wrong_secrets(cp: ControlPlaneHandle, admin) -> None:  # noqa: ANN001
    """80 wrong secrets for one key id, 16 at a time: at most 10 reach scrypt, the rest
    are refused RESOURCE_EXHAUSTED; admin calls (database work) and a good key keep
    being answered meanwhile, and a key first seen during the flood is still verified."""
    admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
    good = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
    fresh = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
    guard = cp.running.services.tenants.guard
    request = pb.ResolveAdapterRequest(adapter="acme/none")  # NOT_FOUND once the key passes
    assert code_of(cp.client(good.api_key).ResolveAdapter, request)[0] == grpc.StatusCode.NOT_FOUND

    def wrong(i: int) -> tuple[grpc.StatusCode, str]:
        return code_of(cp.client(f"lpx_{good.key_id}_{i:040x}").ResolveAdapter, request)

    with ThreadPoolExecutor(16) as pool:
        flood = [pool.submit(wrong, i) for i in range(80)]
        start = time.monotonic()
        for _ in range(5):
            assert admin.ListTenants(pb.ListTenantsRequest()).tenants
            reply = code_of(cp.client(good.api_key).ResolveAdapter, request)
            assert reply[0] == grpc.StatusCode.NOT_FOUND
        served_s = time.monotonic() - start
        refusals = [f.result() for f in flood]
    assert served_s < 5.0, served_s
    codes = {code for code, _ in refusals}
    assert codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    limited = [d for c, d in refusals if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(limited) >= 70
    assert f"too many failed attempts for API key {good.key_id}; retry in" in limited[0]
    assert guard.num_verifications <= 1 + GuardLimits().failures_per_key
    reply = code_of(cp.client(fresh.api_key).ResolveAdapter, request)
    assert reply[0] == grpc.StatusCode.NOT_FOUND  # verified and accepted


def base_request() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=[5, 6, 7]),
        sampling=inference_pb2.SamplingParams(max_new_tokens=2, ignore_eos=True),
    )


def generate_code(engine: RunningEngine, api_key: str) -> tuple[grpc.StatusCode, str]:
    try:
        engine.generate(base_request(), metadata=[("authorization", f"Bearer {api_key}")])
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_an_engine_away_from_its_control_plane_refuses_keys_after_the_ttl(
    clean_db: str, adapter_root: Path, base_dir: Path
) -> None:
    """While the control plane is down the engine serves keys on its last table for
    --key-table-ttl seconds, then refuses them UNAVAILABLE with a sentence; once a
    control plane answers again, the same key is served again."""
    config = replace(cp_config(clean_db, adapter_root), port=free_port())
    ttl_s = 4.0  # above the engine's 2 s heartbeat interval
    first = ExitStack()
    try:
        cp = first.enter_context(running_control_plane(config))
        cp.client().CreateTenant(pb.CreateTenantRequest(name="acme"))
        key = cp.client().CreateApiKey(pb.CreateApiKeyRequest(tenant="acme")).api_key
        served = engine_config(base_dir, adapter_root, cp, key_table_ttl_s=ttl_s)
        with running_engine(served) as engine:
            wait_for(lambda: generate_code(engine, key)[0] == grpc.StatusCode.OK, 15, "the key")
            first.close()  # the control plane goes away
            gone = time.monotonic()
            assert generate_code(engine, key)[0] == grpc.StatusCode.OK  # within the TTL

            def refused() -> tuple[grpc.StatusCode, str] | None:
                answer = generate_code(engine, key)
                return answer if answer[0] == grpc.StatusCode.UNAVAILABLE else None

            _, details = wait_for(refused, 15, "the key table to expire")
            # The last answered heartbeat came up to one interval (2 s) before `gone`.
            assert time.monotonic() - gone >= ttl_s - 2.5
            assert "--key-table-ttl" in details and "control plane" in details
            with running_control_plane(config):  # back, on the same database and port
                wait_for(lambda: generate_code(engine, key)[0] == grpc.StatusCode.OK, 15)
    finally:
        first.close()


def test_a_restored_database_with_a_lower_generation_reaches_the_engines(
    clean_db: str, adapter_root: Path, base_dir: Path, sessions: sessionmaker[Session]
) -> None:
    """The database goes back to a backup (keys made since are gone, the key-table
    generation is lower than the engine's): the control plane notices, moves the
    generation past the engine's, and the engine takes the database's table - a key
    made after the restore works, one lost with the restore does not."""
    config = cp_config(clean_db, adapter_root, key_sync_interval_s=0.3)
    with running_control_plane(config) as cp:
        admin = cp.client()
        admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
        kept = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
        with running_engine(engine_config(base_dir, adapter_root, cp)) as engine:
            wait_for(lambda: generate_code(engine, kept.api_key)[0] == grpc.StatusCode.OK, 15)
            with sessions.begin() as session:  # the backup: its generation
                backup_generation = session.execute(
                    text("SELECT value FROM counters WHERE name = 'api_key_table_generation'")
                ).scalar_one()
            lost = [admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme")) for _ in range(3)]
            wait_for(lambda: generate_code(engine, lost[-1].api_key)[0] == grpc.StatusCode.OK, 15)
            held_before = engine.parts.keys.generation
            with sessions.begin() as session:  # the restore
                session.execute(
                    text("DELETE FROM api_keys WHERE key_id = ANY(:ids)"),
                    {"ids": [k.key_id for k in lost]},
                )
                session.execute(
                    text("UPDATE counters SET value = :v WHERE name = 'api_key_table_generation'"),
                    {"v": backup_generation},
                )
            made_after = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))

            def served_after_restore() -> bool:
                return generate_code(engine, made_after.api_key)[0] == grpc.StatusCode.OK

            wait_for(served_after_restore, 15, "the restored table on the engine")
            assert engine.parts.keys.generation > held_before
            assert generate_code(engine, lost[0].api_key)[0] == grpc.StatusCode.UNAUTHENTICATED
            assert generate_code(engine, kept.api_key)[0] == grpc.StatusCode.OK
            registry = cp.running.metrics.registry
            restores = registry.get_sample_value(
                "loraplex_control_plane_key_generation_restores_total"
            )
            assert restores and restores >= 1
            with sessions.begin() as session:
                actions = session.execute(
                    text("SELECT action FROM audit_events WHERE action LIKE 'key_table.%'")
                ).scalars()
                assert "key_table.generation_restored" in set(actions)
