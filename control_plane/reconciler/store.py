"""The reconciler's database side: a snapshot before a pass, the outcomes after it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

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
    key_generation: int
    keys: tuple[tuple[str, str, str], ...]  # (key_id, secret_hash, tenant)


@dataclass(frozen=True)
class LoadOutcome:
    """The result of one LoadAdapter call; `code` is "" on success, else a status name."""

    version_id: int
    engine_id: int
    code: str = ""
    message: str = ""


@dataclass(frozen=True)
class PassResult:
    observed: Observed
    loads: tuple[LoadOutcome, ...] = ()
    stale_engines: tuple[str, ...] = field(default=())


class ReconcileStore:
    def __init__(
        self, ctx: ServiceContext, *, heartbeat_timeout: timedelta, lease: timedelta,
        retry_base: timedelta, retry_cap: timedelta, fail_after_attempts: int,
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
            # Generation before keys: see TenantService.key_table.
            generation = KeyTableGeneration(session).current()
            keys = tuple(ApiKeyRepository(session).accepted_keys())
            all_engines = engines.all()
            versions = tuple(
                VersionSpec(
                    version_id=row.id,
                    adapter_id=version_adapter_id(row.tenant, row.name, row.number),
                    tenant=row.tenant, path=row.path, sha256=row.sha256,
                    aliases=(adapter_alias(row.tenant, row.name),) if row.current else (),
                    base_model_id=row.base_model_id, replicas=row.replicas,
                )
                for row in active_version_rows(session)
            )
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
                placements=placements, key_generation=generation, keys=keys,
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
            ids = {s.version_id: s.adapter_id for s in _active_specs(session)}
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

    def release(self, owner: str) -> None:
        with self._ctx.sessions.begin() as session:
            EngineRepository(session).release(owner)

    def _record_load(self, row: Placement, outcome: LoadOutcome, now: datetime) -> None:
        if not outcome.code:
            row.observed_state = PlacementObserved.LOADED
            row.attempts, row.permanent_failure = 0, False
            row.last_error, row.next_retry_at = None, None
            return
        row.observed_state = PlacementObserved.FAILED
        row.attempts += 1
        row.last_error = f"{outcome.code}: {outcome.message}"
        row.next_retry_at = now + retry_delay(row.attempts, self._retry_base, self._retry_cap)
        row.permanent_failure = (
            outcome.code in self._permanent_codes and row.attempts >= self._fail_after
        )

    def _fail_versions(self, session: Session, now: datetime) -> list[str]:
        specs = _active_specs(session)
        engines = [
            EngineView(e.id, e.base_model_id, e.state == EngineState.LIVE)
            for e in EngineRepository(session).all()
        ]
        views = {(p.version_id, p.engine_id): _view(p) for p in PlacementRepository(session).all()}
        failed = versions_to_fail(specs, engines, views)
        adapters = AdapterRepository(session)
        for version_id, reason in failed.items():
            version = session.get_one(AdapterVersion, version_id)
            version.state = VersionState.FAILED
            version.failure_reason = reason
            adapter = session.get_one(Adapter, version.adapter_id)
            session.flush()
            if adapter.current_version_id == version_id:
                newest = adapters.newest_active(adapter.id)
                adapter.current_version_id = None if newest is None else newest.id
            AuditRepository(session).record(
                ACTOR, "adapter.fail", _spec_id(specs, version_id), now, {"reason": reason}
            )
        return [_spec_id(specs, v) for v in failed]


def _active_specs(session: Session) -> list[VersionSpec]:
    return [
        VersionSpec(
            version_id=row.id, adapter_id=version_adapter_id(row.tenant, row.name, row.number),
            tenant=row.tenant, path=row.path, sha256=row.sha256, aliases=(),
            base_model_id=row.base_model_id, replicas=row.replicas,
        )
        for row in active_version_rows(session)
    ]


def _spec_id(specs: list[VersionSpec], version_id: int) -> str:
    return next((s.adapter_id for s in specs if s.version_id == version_id), str(version_id))


def _view(p: Placement) -> PlacementView:
    return PlacementView(
        version_id=p.version_id, engine_id=p.engine_id,
        desired=p.desired_state == PlacementDesired.LOADED, attempts=p.attempts,
        permanent_failure=p.permanent_failure, next_retry_at=p.next_retry_at,
        last_error=p.last_error or "",
    )
