"""Engines joining and heartbeating, and where an adapter is served now."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from control_plane.errors import ErrorCode, ServiceError, invalid, not_found, precondition
from control_plane.models import AdapterVersion, ApiKey, Engine, EngineState, VersionState
from control_plane.records import EngineFacts, EngineRecord, Registration, Resolution
from control_plane.repositories.audit import AuditRepository
from control_plane.repositories.catalog import AdapterRepository, BaseModelRepository
from control_plane.repositories.fleet import EngineRepository, PlacementRepository
from control_plane.repositories.tenants import ApiKeyRepository, TenantRepository
from control_plane.services.common import (
    ServiceContext,
    check_adapter_name,
    check_count,
    check_tenant_name,
    check_text,
)

_ADDRESS = re.compile(r"^[A-Za-z0-9.\-_\[\]:]+:\d{1,5}$")
_COUNT_FACTS = (
    "max_loras",
    "max_lora_rank",
    "max_cpu_loras",
    "running_requests",
    "waiting_requests",
    "num_adapters",
)
_ADAPTER_REF = re.compile(
    r"^(?P<tenant>[^/@]+)/(?P<name>[^/@]+)(?:@(?P<version>[0-9]+))?$", re.ASCII
)


class EngineService:
    def __init__(self, ctx: ServiceContext, heartbeat_timeout: timedelta) -> None:
        self._ctx = ctx
        self._heartbeat_timeout = heartbeat_timeout

    def register_engine(self, address: str, facts: EngineFacts, actor: str) -> Registration:
        """Create or refresh the engine at `address`; a new boot id means it restarted."""
        if not _ADDRESS.match(address):
            raise invalid(f"address {address!r} is invalid: expected host:port")
        check_text("address", address, Engine.address)
        if not facts.boot_id:
            raise invalid("info.boot_id is required")
        _check_facts(facts)
        now = self._ctx.clock()
        with self._ctx.sessions.begin() as session:
            model = BaseModelRepository(session).by_fingerprint(facts.model_fingerprint)
            engines = EngineRepository(session)
            engine = engines.by_address(address, for_update=True)
            if engine is None:
                engine = engines.add(
                    address=address,
                    boot_id=facts.boot_id,
                    registered_at=now,
                    last_heartbeat_at=now,
                    state=EngineState.LIVE,
                    model_fingerprint=facts.model_fingerprint,
                )
                AuditRepository(session).record(actor, "engine.register", address, now)
            elif engine.boot_id != facts.boot_id:
                # It restarted: it holds nothing now, and earlier failures may not recur.
                PlacementRepository(session).reset_engine(engine.id, now)
                AuditRepository(session).record(
                    actor, "engine.restart", address, now, {"boot_id": facts.boot_id}
                )
            engine.boot_id = facts.boot_id
            engine.base_model_id = None if model is None else model.id
            engine.registered_at = now
            engine.last_heartbeat_at = now
            engine.state = EngineState.LIVE
            _apply_facts(engine, facts)
            registration = Registration(engine.id, "" if model is None else model.name)
        self._ctx.on_change()
        return registration

    def heartbeat(
        self, engine_id: int, boot_id: str, facts: EngineFacts, key_usage: dict[str, datetime]
    ) -> None:
        """NOT_FOUND / FAILED_PRECONDITION tell the engine to register again."""
        check_count("engine_id", engine_id)
        check_text("boot_id", boot_id, Engine.boot_id)
        _check_facts(facts)
        for key_id in key_usage:
            check_text("key_usage.key_id", key_id, ApiKey.key_id)
        now = self._ctx.clock()
        came_back = False
        with self._ctx.sessions.begin() as session:
            engine = EngineRepository(session).get(engine_id, for_update=True)
            if engine is None:
                raise not_found(f"engine {engine_id} is not registered; register again")
            if engine.boot_id != boot_id:
                raise precondition(
                    f"engine {engine_id} registered with boot id {engine.boot_id}, not "
                    f"{boot_id}; register again"
                )
            came_back = engine.state != EngineState.LIVE
            engine.state = EngineState.LIVE
            engine.last_heartbeat_at = now
            _apply_facts(engine, facts)
            keys = ApiKeyRepository(session)
            for key_id, at in sorted(key_usage.items()):
                keys.record_use(key_id, at)
        if came_back:
            self._ctx.on_change()

    def list_engines(self) -> list[EngineRecord]:
        cutoff = self._ctx.clock() - self._heartbeat_timeout
        with self._ctx.sessions.begin() as session:
            return [
                EngineRecord(
                    engine_id=e.id,
                    address=e.address,
                    boot_id=e.boot_id,
                    base_model=model or "",
                    model_fingerprint=e.model_fingerprint,
                    state=EngineState.STALE if e.last_heartbeat_at < cutoff else e.state,
                    last_heartbeat_at=e.last_heartbeat_at,
                    registered_at=e.registered_at,
                    max_loras=e.max_loras,
                    max_lora_rank=e.max_lora_rank,
                    max_cpu_loras=e.max_cpu_loras,
                    device=e.device,
                    running_requests=e.running_requests,
                    waiting_requests=e.waiting_requests,
                    num_adapters=e.num_adapters,
                    num_placements=placements,
                )
                for e, model, placements in EngineRepository(session).list()
            ]

    def resolve_adapter(self, ref: str, caller_tenant: str | None) -> Resolution:
        """`tenant/name[@version]` to a version and the live engines serving it.

        `caller_tenant` None is the admin; a tenant may only resolve its own adapters.
        """
        match = _ADAPTER_REF.match(ref)
        if match is None:
            raise invalid(
                f"adapter {ref!r} is invalid: expected 'tenant/name' or 'tenant/name@version'"
            )
        tenant_name, name = match["tenant"], match["name"]
        check_tenant_name(tenant_name)
        check_adapter_name(name)
        if match["version"] is not None:  # the column is 32-bit: say so, do not overflow
            check_count(f"the version in {ref!r}", int(match["version"]))
        if caller_tenant is not None and caller_tenant != tenant_name:
            raise ServiceError(
                ErrorCode.PERMISSION_DENIED,
                f"this API key belongs to tenant {caller_tenant!r}, not {tenant_name!r}",
            )
        with self._ctx.sessions.begin() as session:
            tenant = TenantRepository(session).get(tenant_name)
            adapters = AdapterRepository(session)
            adapter = None if tenant is None else adapters.get(tenant.id, name)
            if adapter is None:
                raise not_found(f"no adapter {tenant_name}/{name}")
            if match["version"] is not None:
                version = adapters.version(adapter.id, int(match["version"]))
                if version is None:
                    raise not_found(f"{tenant_name}/{name} has no version {match['version']}")
            elif adapter.current_version_id is None:
                raise precondition(
                    f"{tenant_name}/{name} has no active version: all were retired or failed"
                )
            else:
                version = session.get_one(AdapterVersion, adapter.current_version_id)
            label = f"{tenant_name}/{name}@{version.number}"
            if version.state == VersionState.RETIRED:
                raise precondition(f"{label} was retired")
            if version.state == VersionState.FAILED:
                raise precondition(f"{label} failed to load: {version.failure_reason}")
            cutoff = self._ctx.clock() - self._heartbeat_timeout
            endpoints = adapters.serving_endpoints(version.id, EngineState.LIVE, cutoff)
            model = BaseModelRepository(session).names().get(version.base_model_id, "")
            return Resolution(tenant_name, name, version.number, model, tuple(endpoints))


def _check_facts(facts: EngineFacts) -> None:
    """INVALID_ARGUMENT unless every fact fits its column (the proto allows more)."""
    check_text("info.boot_id", facts.boot_id, Engine.boot_id)
    check_text("info.model_fingerprint", facts.model_fingerprint, Engine.model_fingerprint)
    check_text("info.model_name", facts.model_name, Engine.model_name)
    check_text("info.device", facts.device, Engine.device)
    for field in _COUNT_FACTS:
        check_count(f"info.{field}", getattr(facts, field))


def _apply_facts(engine: Engine, facts: EngineFacts) -> None:
    engine.model_fingerprint = facts.model_fingerprint
    engine.model_name = facts.model_name
    engine.device = facts.device
    engine.max_loras = facts.max_loras
    engine.max_lora_rank = facts.max_lora_rank
    engine.max_cpu_loras = facts.max_cpu_loras
    engine.running_requests = facts.running_requests
    engine.waiting_requests = facts.waiting_requests
    engine.num_adapters = facts.num_adapters
