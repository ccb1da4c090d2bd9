"""SQLAlchemy models: the control plane's truth. Alembic migrations mirror these exactly.

Adapter versions are immutable once created: only their lifecycle columns (state,
failure_reason, retired_at) may change, which a mapper hook enforces.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    inspect,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite returns naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use timezone-aware UTC timestamps")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class TenantState(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class VersionState(StrEnum):
    ACTIVE = "active"
    RETIRED = "retired"
    FAILED = "failed"


class EngineState(StrEnum):
    LIVE = "live"
    STALE = "stale"


class PlacementDesired(StrEnum):
    LOADED = "loaded"
    EVICTED = "evicted"


class PlacementObserved(StrEnum):
    UNKNOWN = "unknown"
    LOADED = "loaded"
    ABSENT = "absent"
    FAILED = "failed"


def _one_of(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint(_one_of("state", TenantState), name="state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=TenantState.ACTIVE)
    max_adapters: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    disabled_at: Mapped[datetime | None]


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class BaseModel(Base):
    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    architecture: Mapped[str] = mapped_column(String(64))
    hidden_size: Mapped[int]
    num_layers: Mapped[int]
    num_heads: Mapped[int]
    num_kv_heads: Mapped[int]
    head_dim: Mapped[int]
    intermediate_size: Mapped[int]
    vocab_size: Mapped[int]
    max_lora_rank: Mapped[int]
    path: Mapped[str] = mapped_column(Text)
    # The folder's config.json as read at registration: adapters are validated against it.
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime]


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    current_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_versions.id", use_alter=True)
    )
    created_at: Mapped[datetime]


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "number"),
        CheckConstraint(_one_of("state", VersionState), name="state"),
        CheckConstraint("number > 0", name="number_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    number: Mapped[int]
    uri: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    config_sha256: Mapped[str] = mapped_column(String(64))
    # engine.formats.chunked_digest of the same bytes as sha256: engines check it on
    # several threads. "" for versions registered before it existed (migration 0003).
    chunked_sha256: Mapped[str] = mapped_column(String(64), default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int]
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    replicas: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=VersionState.ACTIVE)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]


# Columns of an adapter version that may change after creation.
VERSION_LIFECYCLE_COLUMNS = frozenset({"state", "failure_reason", "retired_at"})


@event.listens_for(AdapterVersion, "before_update")
def _refuse_version_content_change(mapper: Any, connection: Any, target: AdapterVersion) -> None:
    state = inspect(target)
    for attr in state.attrs:
        if attr.key not in VERSION_LIFECYCLE_COLUMNS and attr.history.has_changes():
            raise ValueError(f"adapter versions are immutable: cannot change {attr.key}")


class Engine(Base):
    __tablename__ = "engines"
    __table_args__ = (CheckConstraint(_one_of("state", EngineState), name="state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    address: Mapped[str] = mapped_column(String(255), unique=True)
    boot_id: Mapped[str] = mapped_column(String(64))
    model_fingerprint: Mapped[str] = mapped_column(String(128))
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(128), default="")
    device: Mapped[str] = mapped_column(String(64), default="")
    max_loras: Mapped[int] = mapped_column(Integer, default=0)
    max_lora_rank: Mapped[int] = mapped_column(Integer, default=0)
    max_cpu_loras: Mapped[int] = mapped_column(Integer, default=0)
    running_requests: Mapped[int] = mapped_column(Integer, default=0)
    waiting_requests: Mapped[int] = mapped_column(Integer, default=0)
    num_adapters: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=EngineState.LIVE)
    registered_at: Mapped[datetime]
    last_heartbeat_at: Mapped[datetime]
    # Which control-plane replica reconciles this engine, until when (see reconciler).
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]


class Placement(Base):
    __tablename__ = "placements"
    __table_args__ = (
        UniqueConstraint("version_id", "engine_id"),
        CheckConstraint(_one_of("desired_state", PlacementDesired), name="desired_state"),
        CheckConstraint(_one_of("observed_state", PlacementObserved), name="observed_state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    engine_id: Mapped[int] = mapped_column(ForeignKey("engines.id", ondelete="CASCADE"), index=True)
    desired_state: Mapped[str] = mapped_column(String(16))
    observed_state: Mapped[str] = mapped_column(String(16), default=PlacementObserved.UNKNOWN)
    # Failed loads in a row (any code): drives the backoff.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Refusals with a permanent code in a row; any other outcome starts it again at 0.
    permanent_refusals: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set once `permanent_refusals` reaches the limit: the engine refused the adapter
    # itself (not a transient failure), and is not asked again while it runs.
    permanent_failure: Mapped[bool] = mapped_column(default=False)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_retry_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Counter(Base):
    """Named monotonically increasing numbers (the API key table generation)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


KEY_TABLE_GENERATION = "api_key_table_generation"
