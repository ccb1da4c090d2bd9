"""Engines and placements (which version the control plane wants on which engine)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, func, or_, select, update
from sqlalchemy.orm import Session

from control_plane.models import (
    Adapter,
    AdapterVersion,
    BaseModel,
    Engine,
    EngineState,
    Placement,
    PlacementDesired,
    PlacementObserved,
    Tenant,
    VersionState,
)


class EngineRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def get(self, engine_id: int, *, for_update: bool = False) -> Engine | None:
        query = select(Engine).where(Engine.id == engine_id)
        if for_update:
            query = query.with_for_update()
        return self._session.scalars(query).one_or_none()

    def by_address(self, address: str, *, for_update: bool = False) -> Engine | None:
        query = select(Engine).where(Engine.address == address)
        if for_update:
            query = query.with_for_update()
        return self._session.scalars(query).one_or_none()

    def add(self, **columns: Any) -> Engine:
        engine = Engine(**columns)
        self._session.add(engine)
        self._session.flush()
        return engine

    def all(self) -> list[Engine]:
        return list(self._session.scalars(select(Engine).order_by(Engine.id)))

    def list(self) -> list[tuple[Engine, str | None, int]]:
        """Engines with their base model's name and number of desired placements."""
        placements = (
            select(func.count(Placement.id))
            .where(
                Placement.engine_id == Engine.id, Placement.desired_state == PlacementDesired.LOADED
            )
            .correlate(Engine)
            .scalar_subquery()
        )
        query = (
            select(Engine, BaseModel.name, placements)
            .outerjoin(BaseModel, Engine.base_model_id == BaseModel.id)
            .order_by(Engine.address)
        )
        return [(e, n, int(p)) for e, n, p in self._session.execute(query)]

    def mark_stale(self, heartbeat_before: datetime) -> list[str]:
        """Mark live engines whose last heartbeat is older than the cutoff; their addresses."""
        return list(
            self._session.scalars(
                update(Engine)
                .where(
                    Engine.state == EngineState.LIVE, Engine.last_heartbeat_at < heartbeat_before
                )
                .values(state=EngineState.STALE)
                .returning(Engine.address)
            )
        )

    def claim(self, owner: str, now: datetime, lease_until: datetime) -> list[int]:
        """Lease the live engines no other replica holds; ids of the engines now ours.

        `SKIP LOCKED` lets two replicas claim at once without waiting on each other; a
        lease outlives the transaction, so a replica keeps its engines until it stops
        renewing (crash) and the lease runs out.
        """
        query = (
            select(Engine)
            .where(Engine.state == EngineState.LIVE)
            .where(
                or_(
                    Engine.lease_owner.is_(None),
                    Engine.lease_owner == owner,
                    Engine.lease_until < now,
                )
            )
            .order_by(Engine.id)
            .with_for_update(skip_locked=True)
        )
        claimed = list(self._session.scalars(query))
        for engine in claimed:
            engine.lease_owner = owner
            engine.lease_until = lease_until
        self._session.flush()
        return [e.id for e in claimed]

    def renew(self, owner: str, lease_until: datetime) -> int:
        """Extend every lease `owner` holds; the number of engines it holds.

        A lease another replica took over after it ran out is not `owner`'s any more and
        stays as it is.
        """
        result = self._session.execute(
            update(Engine).where(Engine.lease_owner == owner).values(lease_until=lease_until)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def heard_from_since(self, cutoff: datetime) -> list[Engine]:
        """Engines, live or stale, whose last heartbeat is not older than the cutoff."""
        query = select(Engine).where(Engine.last_heartbeat_at >= cutoff).order_by(Engine.id)
        return list(self._session.scalars(query))

    def release(self, owner: str) -> None:
        self._session.execute(
            update(Engine)
            .where(Engine.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        )

    def link_fingerprint(self, fingerprint: str, base_model_id: int) -> int:
        result = self._session.execute(
            update(Engine)
            .where(Engine.model_fingerprint == fingerprint)
            .values(base_model_id=base_model_id)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


class PlacementRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def all(self) -> list[Placement]:
        return list(self._session.scalars(select(Placement).order_by(Placement.id)))

    def for_engines(self, engine_ids: Sequence[int]) -> list[Placement]:
        if not engine_ids:
            return []
        query = select(Placement).where(Placement.engine_id.in_(engine_ids)).with_for_update()
        return list(self._session.scalars(query))

    def add(self, version_id: int, engine_id: int, now: datetime) -> Placement:
        placement = Placement(
            version_id=version_id,
            engine_id=engine_id,
            desired_state=PlacementDesired.LOADED,
            observed_state=PlacementObserved.UNKNOWN,
            attempts=0,
            permanent_refusals=0,
            permanent_failure=False,
            updated_at=now,
        )
        self._session.add(placement)
        self._session.flush()
        return placement

    def delete(self, placement_ids: Sequence[int]) -> None:
        if placement_ids:
            self._session.execute(delete(Placement).where(Placement.id.in_(placement_ids)))

    def reset_engine(self, engine_id: int, now: datetime) -> None:
        """Forget what an engine held and its backoff (it restarted: it holds nothing)."""
        self._session.execute(
            update(Placement)
            .where(Placement.engine_id == engine_id)
            .values(
                observed_state=PlacementObserved.UNKNOWN,
                attempts=0,
                permanent_refusals=0,
                permanent_failure=False,
                next_retry_at=None,
                last_error=None,
                updated_at=now,
            )
        )


def active_version_rows(session: Session) -> Sequence[Row[Any]]:
    """Every active version with what the reconciler needs to place it."""
    query = (
        select(
            AdapterVersion.id,
            AdapterVersion.number,
            AdapterVersion.path,
            AdapterVersion.sha256,
            AdapterVersion.config_sha256,
            AdapterVersion.chunked_sha256,
            AdapterVersion.base_model_id,
            AdapterVersion.replicas,
            Adapter.id.label("adapter_id"),
            Adapter.name,
            Tenant.name.label("tenant"),
            (Adapter.current_version_id == AdapterVersion.id).label("current"),
        )
        .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
        .join(Tenant, Adapter.tenant_id == Tenant.id)
        .where(AdapterVersion.state == VersionState.ACTIVE)
        .order_by(AdapterVersion.id)
    )
    return session.execute(query).all()
