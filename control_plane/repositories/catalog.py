"""Base models, adapters and their immutable versions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from control_plane.models import (
    Adapter,
    AdapterVersion,
    BaseModel,
    Engine,
    Placement,
    PlacementObserved,
    Tenant,
    VersionState,
)


class BaseModelRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, **columns: Any) -> BaseModel:
        model = BaseModel(**columns)
        self._session.add(model)
        self._session.flush()
        return model

    def get(self, name: str) -> BaseModel | None:
        return self._session.scalars(select(BaseModel).where(BaseModel.name == name)).one_or_none()

    def by_fingerprint(self, fingerprint: str) -> BaseModel | None:
        query = select(BaseModel).where(BaseModel.fingerprint == fingerprint)
        return self._session.scalars(query).one_or_none()

    def names(self) -> dict[int, str]:
        return {i: n for i, n in self._session.execute(select(BaseModel.id, BaseModel.name))}

    def list(self) -> list[tuple[BaseModel, int]]:
        engines = (
            select(func.count(Engine.id))
            .where(Engine.base_model_id == BaseModel.id)
            .correlate(BaseModel)
            .scalar_subquery()
        )
        rows = self._session.execute(select(BaseModel, engines).order_by(BaseModel.name))
        return [(m, int(n)) for m, n in rows]


class AdapterRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def get(self, tenant_id: int, name: str, *, for_update: bool = False) -> Adapter | None:
        query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        if for_update:
            query = query.with_for_update()
        return self._session.scalars(query).one_or_none()

    def add(self, tenant_id: int, name: str, now: datetime) -> Adapter:
        adapter = Adapter(tenant_id=tenant_id, name=name, created_at=now)
        self._session.add(adapter)
        self._session.flush()
        return adapter

    def page(self, tenant_id: int | None, after_id: int, limit: int) -> list[tuple[Adapter, str]]:
        """Adapters with their tenant's name, in id order, after `after_id`."""
        query = (
            select(Adapter, Tenant.name)
            .join(Tenant)
            .where(Adapter.id > after_id)
            .order_by(Adapter.id)
            .limit(limit)
        )
        if tenant_id is not None:
            query = query.where(Adapter.tenant_id == tenant_id)
        return [(a, n) for a, n in self._session.execute(query)]

    def versions(self, adapter_ids: Sequence[int]) -> list[AdapterVersion]:
        """Versions of these adapters, newest first within each adapter."""
        if not adapter_ids:
            return []
        query = (
            select(AdapterVersion)
            .where(AdapterVersion.adapter_id.in_(adapter_ids))
            .order_by(AdapterVersion.adapter_id, AdapterVersion.number.desc())
        )
        return list(self._session.scalars(query))

    def version(self, adapter_id: int, number: int) -> AdapterVersion | None:
        query = select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter_id, AdapterVersion.number == number
        )
        return self._session.scalars(query).one_or_none()

    def next_number(self, adapter_id: int) -> int:
        query = select(func.max(AdapterVersion.number)).where(
            AdapterVersion.adapter_id == adapter_id
        )
        return int(self._session.scalar(query) or 0) + 1

    def current_active(self, adapter: Adapter) -> AdapterVersion | None:
        """The adapter's current version if it is active; None otherwise."""
        if adapter.current_version_id is None:
            return None
        version = self._session.get(AdapterVersion, adapter.current_version_id)
        return version if version is not None and version.state == VersionState.ACTIVE else None

    def add_version(self, **columns: Any) -> AdapterVersion:
        version = AdapterVersion(**columns)
        self._session.add(version)
        self._session.flush()
        return version

    def newest_active(self, adapter_id: int) -> AdapterVersion | None:
        query = (
            select(AdapterVersion)
            .where(
                AdapterVersion.adapter_id == adapter_id, AdapterVersion.state == VersionState.ACTIVE
            )
            .order_by(AdapterVersion.number.desc())
            .limit(1)
        )
        return self._session.scalars(query).first()

    def loaded_counts(self, version_ids: Sequence[int]) -> dict[int, int]:
        """Number of engines that report each version loaded."""
        if not version_ids:
            return {}
        query = (
            select(Placement.version_id, func.count(Placement.id))
            .where(
                Placement.version_id.in_(version_ids),
                Placement.observed_state == PlacementObserved.LOADED,
            )
            .group_by(Placement.version_id)
        )
        return {v: int(n) for v, n in self._session.execute(query)}

    def serving_endpoints(
        self, version_id: int, live_state: str, heartbeat_after: datetime
    ) -> list[str]:
        """Addresses of live engines, heard from since the cutoff, that hold the version."""
        query = (
            select(Engine.address)
            .join(Placement, Placement.engine_id == Engine.id)
            .where(
                Placement.version_id == version_id,
                Placement.observed_state == PlacementObserved.LOADED,
                Engine.state == live_state,
                Engine.last_heartbeat_at >= heartbeat_after,
            )
            .order_by(Engine.address)
        )
        return list(self._session.scalars(query))
