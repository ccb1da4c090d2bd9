"""Adapters: registration (validated against the base model), listings, retirement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from control_plane.adapter_source import adapter_refusal, resolve_adapter_uri
from control_plane.errors import ErrorCode, ServiceError, invalid, not_found, precondition
from control_plane.models import Adapter, AdapterVersion, Tenant, TenantState, VersionState
from control_plane.records import AdapterPage, AdapterRecord, VersionRecord
from control_plane.repositories.audit import AuditRepository
from control_plane.repositories.catalog import AdapterRepository, BaseModelRepository
from control_plane.repositories.tenants import TenantRepository
from control_plane.services.common import (
    SHA256_HEX,
    ServiceContext,
    check_adapter_name,
    check_base_model_name,
    check_count,
    check_tenant_name,
)
from engine.formats.adapter_folder import WEIGHTS_FILE
from engine.formats.adapter_header import AdapterSummary, validate_adapter_header
from engine.formats.errors import AdapterFormatError
from engine.model.config import ModelFormatError, parse_model_config

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class _Base:
    """What a registration needs of its base model, read before the folder is."""

    id: int
    name: str
    max_lora_rank: int
    config: dict[str, object]  # config.json as registered


class AdapterService:
    def __init__(self, ctx: ServiceContext, adapter_roots: Sequence[Path]) -> None:
        self._ctx = ctx
        self._roots = tuple(adapter_roots)

    def register_adapter(
        self,
        tenant_name: str,
        name: str,
        uri: str,
        base_model: str,
        *,
        sha256: str = "",
        replicas: int = 0,
        actor: str,
    ) -> VersionRecord:
        """Validate the folder against the base model and make it tenant/name's current
        version.

        Content identical to the current version returns it (idempotent; a different
        `replicas` is refused, as versions are immutable). Any other content, including
        that of an older version, becomes a new version, so registering old content
        again rolls back.
        """
        _check_registration(tenant_name, name, base_model, replicas, sha256)
        base = self._base_model(tenant_name, base_model)
        folder = resolve_adapter_uri(uri, self._roots)
        summary = _checked_against_base(folder, base, sha256)
        content = {
            "sha256": summary.sha256,
            "config_sha256": summary.config_sha256,  # of the very bytes validated
            "base_model_id": base.id,
        }
        now = self._ctx.clock()
        with self._ctx.sessions.begin() as session:
            # The tenant's row lock serializes registrations of one tenant across replicas:
            # the quota count and the next version number cannot race.
            tenant = _active_tenant(TenantRepository(session), tenant_name, for_update=True)
            adapters = AdapterRepository(session)
            adapter = adapters.get(tenant.id, name, for_update=True)
            current = _current_with(adapters, adapter, content, replicas, f"{tenant_name}/{name}")
            if current is not None:
                return version_records(session, adapter, tenant_name, [current])[0]
            if adapter is None or adapters.newest_active(adapter.id) is None:
                # It starts counting against the quota (adapters with an active version).
                _check_quota(TenantRepository(session), tenant, tenant_name)
            if adapter is None:
                adapter = adapters.add(tenant.id, name, now)
            version = _persist_version(
                session, adapter, uri, folder, summary, content, replicas, now
            )
            AuditRepository(session).record(
                actor,
                "adapter.register",
                f"{tenant_name}/{name}@{version.number}",
                now,
                {"uri": uri, "sha256": summary.sha256, "base_model": base.name},
            )
            record = version_records(session, adapter, tenant_name, [version])[0]
        self._ctx.on_change()
        return record

    def _base_model(self, tenant_name: str, base_model: str) -> _Base:
        """The base model to check against; NOT_FOUND / FAILED_PRECONDITION when it or
        the tenant does not exist or the tenant is disabled."""
        with self._ctx.sessions.begin() as session:
            _active_tenant(TenantRepository(session), tenant_name)
            model = BaseModelRepository(session).get(base_model)
            if model is None:
                raise not_found(f"no base model named {base_model!r}; register it first")
            return _Base(model.id, model.name, model.max_lora_rank, model.config)

    def get_adapter(self, tenant_name: str, name: str) -> AdapterRecord:
        with self._ctx.sessions.begin() as session:
            tenant, adapter = _require_adapter(session, tenant_name, name)
            return adapter_records(session, [(adapter, tenant.name)])[0]

    def list_adapters(self, tenant_name: str, page_size: int, page_token: str) -> AdapterPage:
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after_id = _decode_token(page_token)
        with self._ctx.sessions.begin() as session:
            tenant_id = None
            if tenant_name:
                check_tenant_name(tenant_name)
                tenant = TenantRepository(session).get(tenant_name)
                if tenant is None:
                    raise not_found(f"no tenant named {tenant_name!r}")
                tenant_id = tenant.id
            rows = AdapterRepository(session).page(tenant_id, after_id, limit + 1)
            records = adapter_records(session, rows[:limit])
            token = f"a{rows[limit - 1][0].id}" if len(rows) > limit else ""
        return AdapterPage(adapters=tuple(records), next_page_token=token)

    def retire_adapter(
        self, tenant_name: str, name: str, version: int, actor: str
    ) -> tuple[list[VersionRecord], AdapterRecord]:
        """Retire one version (0: all); the alias moves to the newest remaining active one."""
        check_count("version", version)
        now = self._ctx.clock()
        with self._ctx.sessions.begin() as session:
            tenant, adapter = _require_adapter(session, tenant_name, name, for_update=True)
            adapters = AdapterRepository(session)
            if version:
                one = adapters.version(adapter.id, version)
                if one is None:
                    raise not_found(f"{tenant_name}/{name} has no version {version}")
                targets = [one]
            else:
                targets = adapters.versions([adapter.id])
            retired = [v for v in targets if v.state != VersionState.RETIRED]
            for v in retired:
                v.state = VersionState.RETIRED
                v.retired_at = now
            session.flush()
            if adapter.current_version_id in {v.id for v in retired}:
                newest = adapters.newest_active(adapter.id)
                adapter.current_version_id = None if newest is None else newest.id
            session.flush()
            for v in retired:
                AuditRepository(session).record(
                    actor, "adapter.retire", f"{tenant_name}/{name}@{v.number}", now
                )
            retired_records = version_records(session, adapter, tenant.name, retired)
            record = adapter_records(session, [(adapter, tenant.name)])[0]
        self._ctx.on_change()
        return retired_records, record


def _check_registration(
    tenant_name: str, name: str, base_model: str, replicas: int, sha256: str
) -> None:
    """INVALID_ARGUMENT for a request malformed before anything is read."""
    check_tenant_name(tenant_name)
    check_adapter_name(name)
    if not base_model:
        raise invalid("base_model is required: the name of a registered base model")
    check_base_model_name(base_model)
    check_count("replicas", replicas)
    if sha256 and not SHA256_HEX.match(sha256):
        raise invalid(
            f"sha256 {sha256!r} is not a checksum: give the 64 hex digits of "
            "adapter_model.safetensors' sha256, or leave it empty"
        )


def _checked_against_base(folder: Path, base: _Base, sha256: str) -> AdapterSummary:
    """The folder's summary once it validates against `base` (the same checks an engine
    makes before it reads tensor data) and its weights match `sha256` when given."""
    try:
        model_config = parse_model_config(base.config, name=base.name)
        summary = validate_adapter_header(
            folder, model_config, base.max_lora_rank, compute_sha256=True
        )
    except AdapterFormatError as exc:
        raise adapter_refusal(exc, folder, base.name) from exc
    except ModelFormatError as exc:
        raise precondition(
            f"adapter {folder} is not compatible with base model {base.name!r}: {exc}"
        ) from exc
    if sha256 and summary.sha256 != sha256.lower():
        raise precondition(
            f"{folder / WEIGHTS_FILE} has sha256 {summary.sha256}, not the given "
            f"{sha256.lower()}; pass the file's checksum, or leave sha256 empty"
        )
    return summary


def _current_with(
    adapters: AdapterRepository,
    adapter: Adapter | None,
    content: dict[str, object],
    replicas: int,
    label: str,
) -> AdapterVersion | None:
    """The current version when it already holds `content` (registering it again is
    idempotent); INVALID_ARGUMENT when it does with other replicas."""
    current = None if adapter is None else adapters.current_active(adapter)
    if current is None or not _same_content(current, content):
        return None
    if current.replicas != replicas:
        raise invalid(
            f"{label}@{current.number} holds this content with replicas={current.replicas}; "
            "replicas cannot change for existing content: register new content, or retire "
            "the version and register it again"
        )
    return current


def _persist_version(
    session: Session,
    adapter: Adapter,
    uri: str,
    folder: Path,
    summary: AdapterSummary,
    content: dict[str, object],
    replicas: int,
    now: datetime,
) -> AdapterVersion:
    """A new active version of `adapter` holding `content`, made its current one."""
    adapters = AdapterRepository(session)
    version = adapters.add_version(
        adapter_id=adapter.id,
        number=adapters.next_number(adapter.id),
        uri=uri,
        path=str(folder),
        size_bytes=summary.size_bytes,
        rank=summary.rank,
        alpha=summary.alpha,
        target_modules=list(summary.target_modules),
        replicas=replicas,
        state=VersionState.ACTIVE,
        created_at=now,
        chunked_sha256=summary.chunked_sha256,  # of the bytes that gave content's sha256
        **content,
    )
    adapter.current_version_id = version.id
    session.flush()
    return version


def _same_content(version: AdapterVersion, content: dict[str, object]) -> bool:
    return all(getattr(version, column) == value for column, value in content.items())


def _check_quota(tenants: TenantRepository, tenant: Tenant, tenant_name: str) -> None:
    if tenants.count_adapters_in_use(tenant.id) >= tenant.max_adapters:
        raise ServiceError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"tenant {tenant_name!r} has reached its quota of {tenant.max_adapters} adapters "
            "with active versions; register a new version of one of them instead, or free "
            "a place by retiring every version of one it no longer needs (RetireAdapter "
            "with version 0). The quota is CreateTenant's max_adapters.",
        )


def _active_tenant(tenants: TenantRepository, name: str, *, for_update: bool = False) -> Tenant:
    tenant = tenants.get(name, for_update=for_update)
    if tenant is None:
        raise not_found(f"no tenant named {name!r}; create it with CreateTenant")
    if tenant.state != TenantState.ACTIVE:
        raise precondition(f"tenant {name!r} is disabled")
    return tenant


def _require_adapter(
    session: Session, tenant_name: str, name: str, *, for_update: bool = False
) -> tuple[Tenant, Adapter]:
    check_tenant_name(tenant_name)
    check_adapter_name(name)
    tenant = TenantRepository(session).get(tenant_name)
    if tenant is None:
        raise not_found(f"no tenant named {tenant_name!r}")
    adapter = AdapterRepository(session).get(tenant.id, name, for_update=for_update)
    if adapter is None:
        raise not_found(f"tenant {tenant_name!r} has no adapter named {name!r}")
    return tenant, adapter


def _decode_token(token: str) -> int:
    if not token:
        return 0
    digits = token[1:]
    if token.startswith("a") and digits.isascii() and digits.isdigit() and len(digits) <= 10:
        return int(digits)
    raise invalid("page_token is invalid; pass the next_page_token of a previous answer")


def version_records(
    session: Session, adapter: Adapter, tenant: str, versions: Sequence[AdapterVersion]
) -> list[VersionRecord]:
    names = BaseModelRepository(session).names()
    loaded = AdapterRepository(session).loaded_counts([v.id for v in versions])
    return [
        VersionRecord(
            tenant=tenant,
            name=adapter.name,
            version=v.number,
            state=v.state,
            rank=v.rank,
            alpha=v.alpha,
            sha256=v.sha256,
            size_bytes=v.size_bytes,
            uri=v.uri,
            base_model=names.get(v.base_model_id, ""),
            target_modules=tuple(v.target_modules),
            failure_reason=v.failure_reason or "",
            replicas=v.replicas,
            current=adapter.current_version_id == v.id,
            created_at=v.created_at,
            retired_at=v.retired_at,
            num_engines_loaded=loaded.get(v.id, 0),
        )
        for v in versions
    ]


def adapter_records(session: Session, rows: Sequence[tuple[Adapter, str]]) -> list[AdapterRecord]:
    versions = AdapterRepository(session).versions([a.id for a, _ in rows])
    by_adapter: dict[int, list[AdapterVersion]] = {}
    for v in versions:
        by_adapter.setdefault(v.adapter_id, []).append(v)
    records = []
    for adapter, tenant in rows:
        own = by_adapter.get(adapter.id, [])
        current = next((v.number for v in own if v.id == adapter.current_version_id), 0)
        records.append(
            AdapterRecord(
                tenant=tenant,
                name=adapter.name,
                current_version=current,
                versions=tuple(version_records(session, adapter, tenant, own)),
                created_at=adapter.created_at,
            )
        )
    return records
