"""Records to protobuf messages (and the few messages back to records)."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from control_plane.errors import invalid
from control_plane.models import EngineState, TenantState, VersionState
from control_plane.records import (
    AdapterRecord,
    ApiKeyRecord,
    BaseModelRecord,
    EngineFacts,
    EngineRecord,
    TenantRecord,
    VersionRecord,
)
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import engine_admin_pb2 as admin_pb

_TENANT_STATES = {
    TenantState.ACTIVE: pb.TENANT_STATE_ACTIVE,
    TenantState.DISABLED: pb.TENANT_STATE_DISABLED,
}
_VERSION_STATES = {
    VersionState.ACTIVE: pb.ADAPTER_STATE_ACTIVE,
    VersionState.RETIRED: pb.ADAPTER_STATE_RETIRED,
    VersionState.FAILED: pb.ADAPTER_STATE_FAILED,
}
_ENGINE_STATES = {EngineState.LIVE: pb.ENGINE_STATE_LIVE, EngineState.STALE: pb.ENGINE_STATE_STALE}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def from_timestamp(ts: Timestamp, field: str = "timestamp") -> datetime:
    """INVALID_ARGUMENT for what no datetime can hold (nanos outside 0..999999999, a
    year outside 1..9999): the caller sent it, so it must not become INTERNAL."""
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise invalid(f"{field} is not a valid timestamp: {exc}") from exc


def tenant(r: TenantRecord) -> pb.Tenant:
    return pb.Tenant(
        name=r.name,
        state=_TENANT_STATES[TenantState(r.state)],
        max_adapters=r.max_adapters,
        num_adapters=r.num_adapters,
        num_active_keys=r.num_active_keys,
        created_at=timestamp(r.created_at),
    )


def api_key(r: ApiKeyRecord) -> pb.ApiKey:
    return pb.ApiKey(
        key_id=r.key_id,
        tenant=r.tenant,
        created_at=timestamp(r.created_at),
        revoked_at=timestamp(r.revoked_at),
        last_used_at=timestamp(r.last_used_at),
        revoked=r.revoked_at is not None,
    )


def base_model(r: BaseModelRecord) -> pb.BaseModel:
    return pb.BaseModel(
        name=r.name,
        fingerprint=r.fingerprint,
        architecture=r.architecture,
        hidden_size=r.hidden_size,
        num_layers=r.num_layers,
        num_heads=r.num_heads,
        num_kv_heads=r.num_kv_heads,
        head_dim=r.head_dim,
        intermediate_size=r.intermediate_size,
        vocab_size=r.vocab_size,
        max_lora_rank=r.max_lora_rank,
        path=r.path,
        created_at=timestamp(r.created_at),
        num_engines=r.num_engines,
    )


def version(r: VersionRecord) -> pb.AdapterVersion:
    return pb.AdapterVersion(
        tenant=r.tenant,
        name=r.name,
        version=r.version,
        state=_VERSION_STATES[VersionState(r.state)],
        rank=r.rank,
        alpha=r.alpha,
        sha256=r.sha256,
        size_bytes=r.size_bytes,
        uri=r.uri,
        base_model=r.base_model,
        target_modules=list(r.target_modules),
        failure_reason=r.failure_reason,
        replicas=r.replicas,
        adapter_id=r.adapter_id,
        current=r.current,
        created_at=timestamp(r.created_at),
        retired_at=timestamp(r.retired_at),
        num_engines_loaded=r.num_engines_loaded,
    )


def adapter(r: AdapterRecord) -> pb.Adapter:
    return pb.Adapter(
        tenant=r.tenant,
        name=r.name,
        current_version=r.current_version,
        versions=[version(v) for v in r.versions],
        created_at=timestamp(r.created_at),
    )


def engine(r: EngineRecord) -> pb.Engine:
    return pb.Engine(
        engine_id=r.engine_id,
        address=r.address,
        boot_id=r.boot_id,
        base_model=r.base_model,
        model_fingerprint=r.model_fingerprint,
        state=_ENGINE_STATES[EngineState(r.state)],
        last_heartbeat_at=timestamp(r.last_heartbeat_at),
        registered_at=timestamp(r.registered_at),
        max_loras=r.max_loras,
        max_lora_rank=r.max_lora_rank,
        max_cpu_loras=r.max_cpu_loras,
        device=r.device,
        running_requests=r.running_requests,
        waiting_requests=r.waiting_requests,
        num_adapters=r.num_adapters,
        num_placements=r.num_placements,
    )


def engine_facts(info: admin_pb.EngineInfo) -> EngineFacts:
    return EngineFacts(
        boot_id=info.boot_id,
        model_fingerprint=info.model_fingerprint,
        model_name=info.model_name,
        device=info.device,
        max_loras=info.max_loras,
        max_lora_rank=info.max_lora_rank,
        max_cpu_loras=info.max_cpu_loras,
        running_requests=info.running_requests,
        waiting_requests=info.waiting_requests,
        num_adapters=info.num_adapters,
    )
