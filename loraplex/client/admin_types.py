"""What `AdminClient` returns: frozen dataclasses mirroring the ControlPlane messages
field for field (timestamps as timezone-aware datetimes, None when unset; states as
string enums), and the one place that converts those messages."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import control_plane_pb2 as pb

S = TypeVar("S", bound=StrEnum)


class TenantState(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class AdapterState(StrEnum):
    ACTIVE = "active"
    RETIRED = "retired"
    FAILED = "failed"  # no engine could load it; failure_reason says why


class EngineState(StrEnum):
    LIVE = "live"
    STALE = "stale"  # missed heartbeats; nothing is placed on it


@dataclass(frozen=True)
class Tenant:
    name: str
    state: TenantState
    max_adapters: int
    num_adapters: int
    num_active_keys: int
    created_at: datetime | None


@dataclass(frozen=True)
class ApiKey:
    key_id: str  # public prefix: keys read "lpx_<key_id>_<secret>"
    tenant: str
    revoked: bool
    created_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None  # as reported by engines' heartbeats


@dataclass(frozen=True)
class NewApiKey:
    """A key just created: `api_key` is the credential to send, shown this once."""

    key_id: str
    tenant: str
    api_key: str
    secret: str


@dataclass(frozen=True)
class BaseModel:
    name: str
    fingerprint: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_lora_rank: int
    path: str
    num_engines: int
    created_at: datetime | None


@dataclass(frozen=True)
class AdapterVersion:
    tenant: str
    name: str
    version: int
    adapter_id: str  # what engines call it: "tenant/name@version"
    state: AdapterState
    current: bool  # "tenant/name" names this version
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    sha256: str  # of adapter_model.safetensors
    size_bytes: int
    uri: str
    base_model: str
    replicas: int  # 0 = every engine of the base model
    num_engines_loaded: int
    failure_reason: str
    created_at: datetime | None
    retired_at: datetime | None


@dataclass(frozen=True)
class Adapter:
    tenant: str
    name: str
    current_version: int  # 0 = no active version
    versions: tuple[AdapterVersion, ...]  # newest first
    created_at: datetime | None


@dataclass(frozen=True)
class RetireResult:
    retired: tuple[AdapterVersion, ...]  # what this call retired (empty: nothing was active)
    adapter: Adapter


@dataclass(frozen=True)
class Engine:
    engine_id: int
    address: str
    state: EngineState
    base_model: str  # "" when no registered base model has its fingerprint
    model_fingerprint: str
    device: str
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    running_requests: int
    waiting_requests: int
    num_adapters: int
    num_placements: int  # versions the control plane wants on it
    boot_id: str
    registered_at: datetime | None
    last_heartbeat_at: datetime | None


@dataclass(frozen=True)
class Resolution:
    """Which version an adapter name means now, and the engines serving it."""

    adapter_id: str  # "tenant/name@version"
    tenant: str
    name: str
    version: int
    base_model: str
    endpoints: tuple[str, ...]  # addresses of live engines that report it loaded


def _time(message: object, field: str) -> datetime | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    ts: Timestamp = getattr(message, field)
    return ts.ToDatetime(tzinfo=UTC)


def _state(cls: type[S], enum_name: str, value: int) -> S:
    # "ADAPTER_STATE_RETIRED" -> AdapterState.RETIRED
    name = pb.DESCRIPTOR.enum_types_by_name[enum_name].values_by_number[value].name
    return cls(name.split("_STATE_")[-1].lower())


def tenant(m: pb.Tenant) -> Tenant:
    return Tenant(
        name=m.name,
        state=_state(TenantState, "TenantState", m.state),
        max_adapters=m.max_adapters,
        num_adapters=m.num_adapters,
        num_active_keys=m.num_active_keys,
        created_at=_time(m, "created_at"),
    )


def api_key(m: pb.ApiKey) -> ApiKey:
    return ApiKey(
        key_id=m.key_id,
        tenant=m.tenant,
        revoked=m.revoked,
        created_at=_time(m, "created_at"),
        revoked_at=_time(m, "revoked_at"),
        last_used_at=_time(m, "last_used_at"),
    )


def new_api_key(m: pb.CreateApiKeyResponse) -> NewApiKey:
    return NewApiKey(key_id=m.key_id, tenant=m.tenant, api_key=m.api_key, secret=m.secret)


def base_model(m: pb.BaseModel) -> BaseModel:
    return BaseModel(
        name=m.name,
        fingerprint=m.fingerprint,
        architecture=m.architecture,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        intermediate_size=m.intermediate_size,
        vocab_size=m.vocab_size,
        max_lora_rank=m.max_lora_rank,
        path=m.path,
        num_engines=m.num_engines,
        created_at=_time(m, "created_at"),
    )


def adapter_version(m: pb.AdapterVersion) -> AdapterVersion:
    return AdapterVersion(
        tenant=m.tenant,
        name=m.name,
        version=m.version,
        adapter_id=m.adapter_id,
        state=_state(AdapterState, "AdapterState", m.state),
        current=m.current,
        rank=m.rank,
        alpha=m.alpha,
        target_modules=tuple(m.target_modules),
        sha256=m.sha256,
        size_bytes=m.size_bytes,
        uri=m.uri,
        base_model=m.base_model,
        replicas=m.replicas,
        num_engines_loaded=m.num_engines_loaded,
        failure_reason=m.failure_reason,
        created_at=_time(m, "created_at"),
        retired_at=_time(m, "retired_at"),
    )


def adapter(m: pb.Adapter) -> Adapter:
    return Adapter(
        tenant=m.tenant,
        name=m.name,
        current_version=m.current_version,
        versions=tuple(adapter_version(v) for v in m.versions),
        created_at=_time(m, "created_at"),
    )


def retire_result(m: pb.RetireAdapterResponse) -> RetireResult:
    return RetireResult(
        retired=tuple(adapter_version(v) for v in m.retired), adapter=adapter(m.adapter)
    )


def engine(m: pb.Engine) -> Engine:
    return Engine(
        engine_id=m.engine_id,
        address=m.address,
        state=_state(EngineState, "EngineState", m.state),
        base_model=m.base_model,
        model_fingerprint=m.model_fingerprint,
        device=m.device,
        max_loras=m.max_loras,
        max_lora_rank=m.max_lora_rank,
        max_cpu_loras=m.max_cpu_loras,
        running_requests=m.running_requests,
        waiting_requests=m.waiting_requests,
        num_adapters=m.num_adapters,
        num_placements=m.num_placements,
        boot_id=m.boot_id,
        registered_at=_time(m, "registered_at"),
        last_heartbeat_at=_time(m, "last_heartbeat_at"),
    )


def resolution(m: pb.ResolveAdapterResponse) -> Resolution:
    return Resolution(
        adapter_id=m.adapter_id,
        tenant=m.tenant,
        name=m.name,
        version=m.version,
        base_model=m.base_model,
        endpoints=tuple(m.endpoints),
    )
