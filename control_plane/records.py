"""Plain immutable views that services return; nothing here is attached to a session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class TenantRecord:
    name: str
    state: str
    max_adapters: int
    num_adapters: int
    num_active_keys: int
    created_at: datetime


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class NewApiKey:
    key_id: str
    secret: str
    api_key: str
    tenant: str


@dataclass(frozen=True)
class BaseModelRecord:
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
    created_at: datetime
    num_engines: int


@dataclass(frozen=True)
class VersionRecord:
    tenant: str
    name: str
    version: int
    state: str
    rank: int
    alpha: float
    sha256: str
    size_bytes: int
    uri: str
    base_model: str
    target_modules: tuple[str, ...]
    failure_reason: str
    replicas: int
    current: bool
    created_at: datetime
    retired_at: datetime | None
    num_engines_loaded: int

    @property
    def adapter_id(self) -> str:
        return version_adapter_id(self.tenant, self.name, self.version)


@dataclass(frozen=True)
class AdapterRecord:
    tenant: str
    name: str
    current_version: int  # 0 = none
    versions: tuple[VersionRecord, ...]  # newest first
    created_at: datetime


@dataclass(frozen=True)
class AdapterPage:
    adapters: tuple[AdapterRecord, ...]
    next_page_token: str


@dataclass(frozen=True)
class EngineRecord:
    engine_id: int
    address: str
    boot_id: str
    base_model: str
    model_fingerprint: str
    state: str
    last_heartbeat_at: datetime
    registered_at: datetime
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    device: str
    running_requests: int
    waiting_requests: int
    num_adapters: int
    num_placements: int


@dataclass(frozen=True)
class EngineFacts:
    """What an engine reports about itself (from the EngineAdmin EngineInfo message)."""

    boot_id: str
    model_fingerprint: str
    model_name: str = ""
    device: str = ""
    max_loras: int = 0
    max_lora_rank: int = 0
    max_cpu_loras: int = 0
    running_requests: int = 0
    waiting_requests: int = 0
    num_adapters: int = 0


@dataclass(frozen=True)
class Registration:
    engine_id: int
    base_model: str


@dataclass(frozen=True)
class Resolution:
    tenant: str
    name: str
    version: int
    base_model: str
    endpoints: tuple[str, ...]

    @property
    def adapter_id(self) -> str:
        return version_adapter_id(self.tenant, self.name, self.version)


def version_adapter_id(tenant: str, name: str, version: int) -> str:
    """The id engines know a version by: `tenant/name@version`."""
    return f"{tenant}/{name}@{version}"


def adapter_alias(tenant: str, name: str) -> str:
    """The alias engines give the current version: `tenant/name`."""
    return f"{tenant}/{name}"
