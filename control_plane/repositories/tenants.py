"""Tenants, their API keys and the generation number of the key table engines hold."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from control_plane.models import (
    KEY_TABLE_GENERATION,
    Adapter,
    AdapterVersion,
    ApiKey,
    Counter,
    Tenant,
    TenantState,
    VersionState,
)


class TenantRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, name: str, max_adapters: int, now: datetime) -> Tenant:
        tenant = Tenant(
            name=name, state=TenantState.ACTIVE, max_adapters=max_adapters, created_at=now
        )
        self._session.add(tenant)
        self._session.flush()
        return tenant

    def get(self, name: str, *, for_update: bool = False) -> Tenant | None:
        query = select(Tenant).where(Tenant.name == name)
        if for_update:
            query = query.with_for_update()
        return self._session.scalars(query).one_or_none()

    def list(self) -> list[tuple[Tenant, int, int]]:
        """Every tenant with its number of adapters and of unrevoked keys, by name."""
        adapters = (
            select(func.count(Adapter.id))
            .where(Adapter.tenant_id == Tenant.id)
            .correlate(Tenant)
            .scalar_subquery()
        )
        keys = (
            select(func.count(ApiKey.id))
            .where(ApiKey.tenant_id == Tenant.id, ApiKey.revoked_at.is_(None))
            .correlate(Tenant)
            .scalar_subquery()
        )
        rows = self._session.execute(select(Tenant, adapters, keys).order_by(Tenant.name))
        return [(t, int(a), int(k)) for t, a, k in rows]

    def count_adapters(self, tenant_id: int) -> int:
        query = select(func.count(Adapter.id)).where(Adapter.tenant_id == tenant_id)
        return int(self._session.scalar(query) or 0)

    def count_adapters_in_use(self, tenant_id: int) -> int:
        """Adapters of the tenant with at least one active version: what its quota counts."""
        active = select(AdapterVersion.id).where(
            AdapterVersion.adapter_id == Adapter.id, AdapterVersion.state == VersionState.ACTIVE
        )
        query = select(func.count(Adapter.id)).where(
            Adapter.tenant_id == tenant_id, active.exists()
        )
        return int(self._session.scalar(query) or 0)

    def count_active_keys(self, tenant_id: int) -> int:
        query = select(func.count(ApiKey.id)).where(
            ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None)
        )
        return int(self._session.scalar(query) or 0)


class ApiKeyRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, tenant_id: int, key_id: str, secret_hash: str, now: datetime) -> ApiKey:
        key = ApiKey(tenant_id=tenant_id, key_id=key_id, secret_hash=secret_hash, created_at=now)
        self._session.add(key)
        self._session.flush()
        return key

    def get(self, key_id: str, *, for_update: bool = False) -> tuple[ApiKey, Tenant] | None:
        query = select(ApiKey, Tenant).join(Tenant).where(ApiKey.key_id == key_id)
        if for_update:
            query = query.with_for_update(of=ApiKey)
        row = self._session.execute(query).one_or_none()
        return None if row is None else (row[0], row[1])

    def list(self, tenant_id: int | None) -> list[tuple[ApiKey, str]]:
        query = select(ApiKey, Tenant.name).join(Tenant).order_by(Tenant.name, ApiKey.id)
        if tenant_id is not None:
            query = query.where(ApiKey.tenant_id == tenant_id)
        return [(k, n) for k, n in self._session.execute(query)]

    def accepted_keys(self) -> list[tuple[str, str, str]]:
        """`(key_id, secret_hash, tenant)` of unrevoked keys of active tenants."""
        query = (
            select(ApiKey.key_id, ApiKey.secret_hash, Tenant.name)
            .join(Tenant)
            .where(ApiKey.revoked_at.is_(None), Tenant.state == TenantState.ACTIVE)
            .order_by(ApiKey.key_id)
        )
        return [(k, h, t) for k, h, t in self._session.execute(query)]

    def record_use(self, key_id: str, at: datetime) -> None:
        self._session.execute(
            update(ApiKey)
            .where(ApiKey.key_id == key_id)
            .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < at))
            .values(last_used_at=at)
        )


class KeyTableGeneration:
    """The number engines compare to ignore stale key tables; bumped on every change."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def bump(self) -> int:
        """Increment under the row's lock (so concurrent changes get distinct numbers)."""
        value = self._session.scalar(
            update(Counter)
            .where(Counter.name == KEY_TABLE_GENERATION)
            .values(value=Counter.value + 1)
            .returning(Counter.value)
        )
        if value is None:
            self._session.add(Counter(name=KEY_TABLE_GENERATION, value=2))
            self._session.flush()
            return 2
        return int(value)

    def advance_past(self, held: int) -> int | None:
        """After a database restore an engine may hold a generation the database never
        reached again: move the generation to `held + 1` (under the row's lock), so
        engines take the database's table. None when it is already at `held` or beyond
        (the engine's table came from this database)."""
        query = select(Counter).where(Counter.name == KEY_TABLE_GENERATION).with_for_update()
        row = self._session.scalar(query)
        if row is not None and row.value >= held:
            return None
        if row is None:
            row = Counter(name=KEY_TABLE_GENERATION, value=held + 1)
            self._session.add(row)
        row.value = held + 1
        self._session.flush()
        return held + 1

    def current(self) -> int:
        """The generation now. Read it before the keys it describes: a change committed
        in between carries a higher generation and is pushed again, so a key table never
        claims a generation newer than its content."""
        query = select(Counter.value).where(Counter.name == KEY_TABLE_GENERATION)
        return int(self._session.scalar(query) or 1)
