"""The reconciler's database side: a snapshot before a pass, the outcomes after it,
lease renewals, and the key table with the engines it goes to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row
from sqlalchemy.orm import Session

from control_plane.models import (
    Adapter,
    AdapterVersion,
    EngineState,
    Placement,
    PlacementDesired,
    PlacementObserved,
    VersionState,
)
from control_plane.reconciler.plan import (
    Desired,
    EngineView,
    Observed,
    PlacementKey,
    PlacementView,
    VersionSpec,
    retry_delay,
    versions_to_fail,
)
from control_plane.records import adapter_alias, version_adapter_id
from control_plane.repositories.audit import AuditRepository
from control_plane.repositories.catalog import AdapterRepository
from control_plane.repositories.fleet import (
    EngineRepository,
    PlacementRepository,
    active_version_rows,
)
from control_plane.repositories.tenants import ApiKeyRepository, KeyTableGeneration
from control_plane.services.common import ServiceContext

ACTOR = "reconciler"


@dataclass(frozen=True)
class Snapshot:
    versions: tuple[VersionSpec, ...]
    engines: tuple[EngineView, ...]
    addresses: Mapping[int, str]  # engine id -> address, for the engines this replica holds
    placements: Mapping[PlacementKey, PlacementView]


@dataclass(frozen=True)
class KeyTarget:
    """An engine that should hold the key table; a new boot id means an empty table."""

    engine_id: int
    address: str
    boot_id: str


KeyTable = tuple[tuple[str, str, str], ...]  # (key_id, secret_hash, tenant)


@dataclass(frozen=True)
class LoadAttempt:
    """The result of one LoadAdapter call; `code` is "" on success, else a status name."""

    version_id: int
    engine_id: int
    code: str = ""
    message: str = ""


@dataclass(frozen=True)
class PassResult:
    observed: Observed
    loads: tuple[LoadAttempt, ...] = ()
    stale_engines: tuple[str, ...] = field(default=())


class ReconcileStore:
    def __init__(
        self,
        ctx: ServiceContext,
        *,
        heartbeat_timeout: timedelta,
        lease: timedelta,
        retry_base: timedelta,
        retry_cap: timedelta,
        fail_after_attempts: int,
        permanent_codes: frozenset[str],
    ) -> None:
        self._ctx = ctx
        self._heartbeat_timeout = heartbeat_timeout
        self._lease = lease
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._fail_after = fail_after_attempts
        self._permanent_codes = permanent_codes

    def begin_pass(self, owner: str, now: datetime) -> tuple[Snapshot, list[str]]:
        """Mark silent engines stale, lease the engines no other replica holds, read state.

        Returns the snapshot and the addresses of engines that just went stale.
        """
        with self._ctx.sessions.begin() as session:
            engines = EngineRepository(session)
            stale = engines.mark_stale(now - self._heartbeat_timeout)
            claimed = set(engines.claim(owner, now, now + self._lease))
            for address in stale:
                AuditRepository(session).record(ACTOR, "engine.stale", address, now)
            all_engines = engines.all()
            versions = tuple(_specs(active_version_rows(session)))
            placements = {
                (p.version_id, p.engine_id): _view(p) for p in PlacementRepository(session).all()
            }
            return Snapshot(
                versions=versions,
                engines=tuple(
                    EngineView(e.id, e.base_model_id, e.state == EngineState.LIVE)
                    for e in all_engines
                ),
                addresses={e.id: e.address for e in all_engines if e.id in claimed},
                placements=placements,
            ), stale

    def finish_pass(self, desired: Desired, result: PassResult, now: datetime) -> list[str]:
        """Record what engines hold and how loads went; fail versions nobody can load.

        Only engines in `result.observed` are touched. Returns the adapter ids of versions
        marked failed.
        """
        engine_ids = sorted(result.observed)
        outcomes = {(o.version_id, o.engine_id): o for o in result.loads}
        with self._ctx.sessions.begin() as session:
            placements = PlacementRepository(session)
            rows = {(p.version_id, p.engine_id): p for p in placements.for_engines(engine_ids)}
            ids = {s.version_id: s.adapter_id for s in _specs(active_version_rows(session))}
            for version_id, wanted in desired.items():
                for engine_id in wanted & set(engine_ids):
                    if (version_id, engine_id) not in rows:
                        rows[(version_id, engine_id)] = placements.add(version_id, engine_id, now)
            gone = []
            for key, row in rows.items():
                version_id, engine_id = key
                held = result.observed[engine_id]
                wanted = engine_id in desired.get(version_id, frozenset())
                row.desired_state = PlacementDesired.LOADED if wanted else PlacementDesired.EVICTED
                adapter_id = ids.get(version_id)
                is_held = adapter_id is not None and adapter_id in held
                outcome = outcomes.get(key)
                if outcome is not None:
                    self._record_load(row, outcome, now)
                elif is_held:
                    row.observed_state = PlacementObserved.LOADED
                    row.permanent_refusals = 0  # held: the refusals are no longer in a row
                elif row.observed_state != PlacementObserved.FAILED:
                    row.observed_state = PlacementObserved.ABSENT
                row.updated_at = now
                # A refusal for good is remembered while the version lives, so the engine
                # is not asked again (an engine restart clears it).
                keep = row.permanent_failure and adapter_id is not None
                if not wanted and not is_held and outcome is None and not keep:
                    gone.append(row.id)
            placements.delete(gone)
            session.flush()
            return self._fail_versions(session, now)

    def renew(self, owner: str, now: datetime) -> int:
        """Extend the leases `owner` holds to `now` + the lease; how many it holds."""
        with self._ctx.sessions.begin() as session:
            return EngineRepository(session).renew(owner, now + self._lease)

    def release(self, owner: str) -> None:
        with self._ctx.sessions.begin() as session:
            EngineRepository(session).release(owner)

    def key_targets(self, now: datetime, gone_after: timedelta) -> tuple[int, list[KeyTarget]]:
        """The key table's generation, and every engine heard from within `gone_after`.

        Stale engines are included: staleness stops placement, not key updates.
        """
        with self._ctx.sessions.begin() as session:
            generation = KeyTableGeneration(session).current()
            engines = EngineRepository(session).heard_from_since(now - gone_after)
            return generation, [KeyTarget(e.id, e.address, e.boot_id) for e in engines]

    def advance_key_generation(self, held: int, address: str, now: datetime) -> int | None:
        """An engine holds generation `held`: if the database is behind it (restored),
        move the generation past it and audit that; the new generation, else None."""
        with self._ctx.sessions.begin() as session:
            moved = KeyTableGeneration(session).advance_past(held)
            if moved is not None:
                details = {"engine_held": held, "now": moved}
                AuditRepository(session).record(
                    ACTOR, "key_table.generation_restored", address, now, details
                )
            return moved

    def key_table(self) -> tuple[int, KeyTable]:
        """`(generation, keys)`: the generation is read first (see KeyTableGeneration)."""
        with self._ctx.sessions.begin() as session:
            generation = KeyTableGeneration(session).current()
            return generation, tuple(ApiKeyRepository(session).accepted_keys())

    def _record_load(self, row: Placement, outcome: LoadAttempt, now: datetime) -> None:
        if not outcome.code:
            row.observed_state = PlacementObserved.LOADED
            row.attempts, row.permanent_refusals, row.permanent_failure = 0, 0, False
            row.last_error, row.next_retry_at = None, None
            return
        row.observed_state = PlacementObserved.FAILED
        row.attempts += 1
        # Only refusals in a row are final: one timeout in between says the engine may
        # not have judged the adapter itself (a file still being copied, a busy disk).
        permanent = outcome.code in self._permanent_codes
        row.permanent_refusals = row.permanent_refusals + 1 if permanent else 0
        row.last_error = f"{outcome.code}: {outcome.message}"
        row.next_retry_at = now + retry_delay(row.attempts, self._retry_base, self._retry_cap)
        row.permanent_failure = row.permanent_refusals >= self._fail_after

    def _fail_versions(self, session: Session, now: datetime) -> list[str]:
        rows = active_version_rows(session)
        specs = _specs(rows)
        engines = [
            EngineView(e.id, e.base_model_id, e.state == EngineState.LIVE)
            for e in EngineRepository(session).all()
        ]
        views = {(p.version_id, p.engine_id): _view(p) for p in PlacementRepository(session).all()}
        failed = versions_to_fail(specs, engines, views)
        owner = {row.id: row.adapter_id for row in rows}
        label = {s.version_id: s.adapter_id for s in specs}
        adapters = AdapterRepository(session)
        marked = []
        # Adapter row first, then the version: the order RetireAdapter and RegisterAdapter
        # lock in (no deadlock), and the alias is chosen from what is committed now (no
        # lost update of a version registered since the snapshot).
        for version_id in sorted(failed, key=lambda v: (owner[v], v)):
            adapter = session.get_one(
                Adapter, owner[version_id], with_for_update=True, populate_existing=True
            )
            version = session.get_one(
                AdapterVersion, version_id, with_for_update=True, populate_existing=True
            )
            if version.state != VersionState.ACTIVE:
                continue  # retired while this pass ran: that decision stands
            version.state = VersionState.FAILED
            version.failure_reason = failed[version_id]
            session.flush()
            if adapter.current_version_id == version_id:
                newest = adapters.newest_active(adapter.id)
                adapter.current_version_id = None if newest is None else newest.id
            AuditRepository(session).record(
                ACTOR, "adapter.fail", label[version_id], now, {"reason": failed[version_id]}
            )
            marked.append(label[version_id])
        return marked


def _specs(rows: Sequence[Row[Any]]) -> list[VersionSpec]:
    return [
        VersionSpec(
            version_id=row.id,
            adapter_id=version_adapter_id(row.tenant, row.name, row.number),
            tenant=row.tenant,
            path=row.path,
            sha256=row.sha256,
            aliases=(adapter_alias(row.tenant, row.name),) if row.current else (),
            base_model_id=row.base_model_id,
            replicas=row.replicas,
            config_sha256=row.config_sha256,
            chunked_sha256=row.chunked_sha256,
        )
        for row in rows
    ]


def _view(p: Placement) -> PlacementView:
    return PlacementView(
        version_id=p.version_id,
        engine_id=p.engine_id,
        desired=p.desired_state == PlacementDesired.LOADED,
        attempts=p.attempts,
        permanent_failure=p.permanent_failure,
        next_retry_at=p.next_retry_at,
        last_error=p.last_error or "",
    )
