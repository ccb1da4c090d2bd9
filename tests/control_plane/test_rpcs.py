"""Admin RPCs and their errors: auth, tenants, keys, base models, engines.

A real server on real Postgres."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from control_plane.db import make_db_engine, make_session_factory
from control_plane.errors import ErrorCode, ServiceError
from control_plane.services.common import ServiceContext
from control_plane.services.tenants import TenantService
from engine.formats.checkpoint import model_fingerprint
from engine.model.config import load_model_config
from loraplex.keys import hash_secret
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


def test_empty_admin_token_says_how_to_set_it(cp: ControlPlaneHandle) -> None:
    code, details = code_of(cp.client("").ListTenants, pb.ListTenantsRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "no admin token sent" in details and "LORAPLEX_ADMIN_TOKEN" in details
    assert "--admin-token" in details


def test_max_adapters_beyond_the_column_is_invalid(admin: Client) -> None:
    code, details = code_of(
        admin.CreateTenant, pb.CreateTenantRequest(name="acme", max_adapters=3_000_000_000)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_adapters" in details
    assert admin.ListTenants(pb.ListTenantsRequest()).tenants == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("boot_id", "b" * 65),
        ("model_fingerprint", "f" * 129),
        ("model_name", "m" * 129),
        ("device", "d" * 65),
        ("boot_id", "boot\x00"),
        ("max_loras", 3_000_000_000),
        ("running_requests", 3_000_000_000),
    ],
)
def test_engine_facts_beyond_their_columns_are_invalid(
    admin: Client, field: str, value: object
) -> None:
    info = admin_pb.EngineInfo(boot_id="boot-1", model_fingerprint="f")
    registered = admin.RegisterEngine(pb.RegisterEngineRequest(address="127.0.0.1:7001", info=info))
    setattr(info, field, value)
    for call, request in (
        (admin.RegisterEngine, pb.RegisterEngineRequest(address="127.0.0.1:7002", info=info)),
        (
            admin.Heartbeat,
            pb.HeartbeatRequest(engine_id=registered.engine_id, boot_id="boot-1", info=info),
        ),
    ):
        code, details = code_of(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert field in details, details
    assert len(admin.ListEngines(pb.ListEnginesRequest()).engines) == 1


def test_long_engine_address_is_invalid_not_internal(admin: Client) -> None:
    info = admin_pb.EngineInfo(boot_id="boot-1", model_fingerprint="f")
    address = "h" * 251 + ":7001"  # 256 characters
    code, details = code_of(
        admin.RegisterEngine, pb.RegisterEngineRequest(address=address, info=info)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "address" in details
    fits = "h" * 250 + ":7001"  # fits its column; its audit actor is cut to fit
    assert admin.RegisterEngine(pb.RegisterEngineRequest(address=fits, info=info)).engine_id


def test_resolve_with_a_key_runs_scrypt_once_per_key(cp: ControlPlaneHandle, admin: Client) -> None:
    admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
    key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
    guard = cp.running.services.tenants.guard  # counts the scrypt runs it starts
    request = pb.ResolveAdapterRequest(adapter="acme/none")
    tenant = cp.client(key.api_key)
    for _ in range(5):  # the key is good: the adapter is what is missing
        assert code_of(tenant.ResolveAdapter, request)[0] == grpc.StatusCode.NOT_FOUND
    assert guard.num_verifications == 1
    forged = cp.client(f"lpx_{key.key_id}_{'x' * len(key.secret)}")
    for _ in range(3):
        assert code_of(forged.ResolveAdapter, request)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert guard.num_verifications == 2
    admin.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.key_id))  # read on every call
    assert code_of(tenant.ResolveAdapter, request)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert guard.num_verifications == 2


def test_a_changed_stored_hash_is_verified_again(admin: Client, clean_db: str) -> None:
    admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
    key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
    engine = make_db_engine(clean_db)
    services = TenantService(ServiceContext(make_session_factory(engine)), 10)
    try:
        assert services.authenticate(key.api_key) == "acme"
        with engine.begin() as conn:  # the row's hash no longer matches the secret
            conn.execute(text("UPDATE api_keys SET secret_hash = :h"), {"h": hash_secret("x")})
        with pytest.raises(ServiceError) as exc:
            services.authenticate(key.api_key)
        assert exc.value.code == ErrorCode.UNAUTHENTICATED
    finally:
        engine.dispose()
