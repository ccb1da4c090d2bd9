"""Admin RPCs and their errors: auth, tenants, keys, base models, engines.

A real server on real Postgres."""

from __future__ import annotations

from pathlib import Path

import grpc
from sqlalchemy import text

from control_plane.db import make_db_engine
from engine.model.config import load_model_config
from engine.model.loader import model_fingerprint
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import engine_admin_pb2 as admin_pb
from tests.control_plane.cp_harness import Client, ControlPlaneHandle
from tests.control_plane.rpc_helpers import BASE, code_of


def test_admin_token_is_required(cp: ControlPlaneHandle) -> None:
    request = pb.ListTenantsRequest()
    assert code_of(cp.client(None).ListTenants, request)[0] == grpc.StatusCode.UNAUTHENTICATED
    code, details = code_of(cp.client("wrong").ListTenants, request)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "admin token" in details
    code, _ = code_of(cp.client("lpx_abc_def").ListTenants, request)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert cp.client().ListTenants(request).tenants == []


def test_tenants(admin: Client) -> None:
    tenant = admin.CreateTenant(pb.CreateTenantRequest(name="acme", max_adapters=5))
    assert (tenant.name, tenant.state, tenant.max_adapters) == ("acme", pb.TENANT_STATE_ACTIVE, 5)
    code, details = code_of(admin.CreateTenant, pb.CreateTenantRequest(name="acme"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "acme" in details
    for bad in ("", "Acme", "a/b", "a@b", "1abc"):
        assert code_of(admin.CreateTenant, pb.CreateTenantRequest(name=bad))[0] == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    admin.CreateTenant(pb.CreateTenantRequest(name="globex"))
    assert [t.name for t in admin.ListTenants(pb.ListTenantsRequest()).tenants] == [
        "acme",
        "globex",
    ]
    disabled = admin.DisableTenant(pb.DisableTenantRequest(name="acme"))
    assert disabled.state == pb.TENANT_STATE_DISABLED
    assert code_of(admin.DisableTenant, pb.DisableTenantRequest(name="nope"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    code, details = code_of(admin.CreateApiKey, pb.CreateApiKeyRequest(tenant="acme"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "disabled" in details


def test_api_keys(admin: Client, clean_db: str) -> None:
    admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
    assert code_of(admin.CreateApiKey, pb.CreateApiKeyRequest(tenant="nope"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
    assert key.api_key == f"lpx_{key.key_id}_{key.secret}" and key.tenant == "acme"
    engine = make_db_engine(clean_db)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT secret_hash FROM api_keys")).scalar_one()
        generation = conn.execute(text("SELECT value FROM counters")).scalar_one()
    assert key.secret not in stored and stored.startswith("scrypt$")
    listed = admin.ListApiKeys(pb.ListApiKeysRequest(tenant="acme")).keys
    assert [(k.key_id, k.revoked) for k in listed] == [(key.key_id, False)]
    revoked = admin.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.key_id))
    assert revoked.revoked and revoked.HasField("revoked_at")
    admin.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.key_id))  # idempotent
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM counters")).scalar_one() == generation + 1
    engine.dispose()
    assert code_of(admin.RevokeApiKey, pb.RevokeApiKeyRequest(key_id="nope"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )


def test_base_models(admin: Client, base_dir: Path, tmp_path: Path) -> None:
    model = admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=BASE, path=str(base_dir)))
    config = load_model_config(base_dir)
    assert model.fingerprint == model_fingerprint(config, base_dir)
    assert (model.hidden_size, model.num_layers, model.max_lora_rank) == (64, 2, 16)
    assert model.architecture == "LlamaForCausalLM"
    request = pb.RegisterBaseModelRequest(name=BASE, path=str(base_dir))
    assert code_of(admin.RegisterBaseModel, request)[0] == grpc.StatusCode.ALREADY_EXISTS
    code, details = code_of(
        admin.RegisterBaseModel, pb.RegisterBaseModelRequest(name="copy", path=str(base_dir))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and BASE in details
    code, _ = code_of(
        admin.RegisterBaseModel,
        pb.RegisterBaseModelRequest(name="x", path=str(tmp_path / "missing")),
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = code_of(
        admin.RegisterBaseModel, pb.RegisterBaseModelRequest(name="x", path=str(tmp_path))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "config.json" in details
    assert [m.name for m in admin.ListBaseModels(pb.ListBaseModelsRequest()).base_models] == [BASE]


def test_engines_register_and_heartbeat(admin: Client, base_dir: Path) -> None:
    fingerprint = model_fingerprint(load_model_config(base_dir), base_dir)
    info = admin_pb.EngineInfo(boot_id="boot-1", model_fingerprint=fingerprint, max_loras=4)
    first = admin.RegisterEngine(pb.RegisterEngineRequest(address="127.0.0.1:7001", info=info))
    assert first.base_model == ""  # no base model with that fingerprint yet
    admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=BASE, path=str(base_dir)))
    [engine] = admin.ListEngines(pb.ListEnginesRequest()).engines
    assert (engine.base_model, engine.state, engine.max_loras) == (BASE, pb.ENGINE_STATE_LIVE, 4)
    admin.Heartbeat(pb.HeartbeatRequest(engine_id=first.engine_id, boot_id="boot-1", info=info))
    code = code_of(admin.Heartbeat, pb.HeartbeatRequest(engine_id=999, boot_id="boot-1"))[0]
    assert code == grpc.StatusCode.NOT_FOUND
    code = code_of(
        admin.Heartbeat, pb.HeartbeatRequest(engine_id=first.engine_id, boot_id="boot-2")
    )[0]
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    info.boot_id = "boot-2"  # a restart keeps the engine's identity (its address)
    again = admin.RegisterEngine(pb.RegisterEngineRequest(address="127.0.0.1:7001", info=info))
    assert again.engine_id == first.engine_id and again.base_model == BASE
    assert (
        code_of(admin.RegisterEngine, pb.RegisterEngineRequest(address="nope", info=info))[0]
        == grpc.StatusCode.INVALID_ARGUMENT
    )

