"""The reconciler's database side on real Postgres: leases, refusal streaks, and marking
versions failed while admins register and retire at the same time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from control_plane.models import (
    Adapter,
    AdapterVersion,
    BaseModel,
    EngineState,
    Placement,
    PlacementDesired,
    PlacementObserved,
    Tenant,
    VersionState,
)
from control_plane.reconciler.config import PERMANENT_CODES
from control_plane.reconciler.store import LoadAttempt, PassResult, ReconcileStore
from control_plane.repositories.catalog import AdapterRepository
from control_plane.repositories.fleet import EngineRepository
from control_plane.services.common import ServiceContext
from tests.control_plane.test_reconciler import wait_for

NOW = datetime(2026, 1, 1, tzinfo=UTC)
Sessions = sessionmaker[Session]


def make_store(sessions: Sessions) -> ReconcileStore:
    return ReconcileStore(
        ServiceContext(sessions=sessions, clock=lambda: NOW),
        heartbeat_timeout=timedelta(hours=1),
        lease=timedelta(seconds=60),
        retry_base=timedelta(seconds=1),
        retry_cap=timedelta(seconds=60),
        fail_after_attempts=3,
        permanent_codes=PERMANENT_CODES,
    )


def add_version(session: Session, adapter: Adapter, number: int) -> AdapterVersion:
    version = AdapterVersion(
        adapter_id=adapter.id,
        number=number,
        uri=f"/a/{number}",
        path=f"/a/{number}",
        sha256=f"{number:064x}",
        config_sha256="0" * 64,
        size_bytes=1,
        rank=4,
        alpha=8.0,
        target_modules=["q_proj"],
        base_model_id=1,
        replicas=0,
        state=VersionState.ACTIVE,
        created_at=NOW,
    )
    session.add(version)
    session.flush()
    return version


@pytest.fixture
def fleet(sessions: Sessions) -> Sessions:
    """acme/a with versions 1 and 2 (current) and one live engine, which refused v2 for
    good: the next finish_pass marks v2 failed and moves the alias."""
    with sessions.begin() as session:
        session.add(
            BaseModel(
                name="tiny",
                fingerprint="f",
                architecture="llama",
                hidden_size=64,
                num_layers=2,
                num_heads=4,
                num_kv_heads=2,
                head_dim=16,
                intermediate_size=128,
                vocab_size=100,
                max_lora_rank=16,
                path="/m",
                config={},
                created_at=NOW,
            )
        )
        session.add(Tenant(name="acme", state="active", max_adapters=10, created_at=NOW))
        session.flush()
        adapter = Adapter(tenant_id=1, name="a", created_at=NOW)
        session.add(adapter)
        session.flush()
        add_version(session, adapter, 1)
        adapter.current_version_id = add_version(session, adapter, 2).id
        engine = EngineRepository(session).add(
            address="127.0.0.1:7000",
            boot_id="b",
            model_fingerprint="f",
            base_model_id=1,
            registered_at=NOW,
            last_heartbeat_at=NOW,
            state=EngineState.LIVE,
        )
        session.add(
            Placement(
                version_id=2,
                engine_id=engine.id,
                desired_state=PlacementDesired.LOADED,
                observed_state=PlacementObserved.FAILED,
                attempts=3,
                permanent_refusals=3,
                permanent_failure=True,
                last_error="FAILED_PRECONDITION: rank",
                updated_at=NOW,
            )
        )
    return sessions


def race(
    sessions: Sessions, first: Callable[[Session], None], then: Callable[[Session], None]
) -> list[str]:
    """Run `first` in an admin's transaction, then a finish_pass in a thread; once that
    waits for a lock, run `then` in the same transaction and commit. The pass's result."""
    result: list[str] = []
    errors: list[BaseException] = []

    def finish() -> None:
        try:
            result.extend(make_store(sessions).finish_pass({}, PassResult(observed={}), NOW))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    def lock_waits() -> int:
        with sessions() as session:
            return int(
                session.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
                or 0
            )

    thread = threading.Thread(target=finish)
    try:
        with sessions.begin() as session:
            first(session)
            thread.start()
            wait_for(lock_waits, 10, "the pass to wait for a lock")
            then(session)
    finally:
        if thread.ident is not None:
            thread.join(20)
    assert not errors, errors
    return result


def lock_adapter(session: Session) -> Adapter:
    adapter = AdapterRepository(session).get(1, "a", for_update=True)
    assert adapter is not None
    return adapter


def test_failing_a_version_keeps_a_version_registered_meanwhile_current(fleet: Sessions) -> None:
    def register_v3(session: Session) -> None:
        adapter = lock_adapter(session)
        adapter.current_version_id = add_version(session, adapter, 3).id
        session.flush()

    assert race(fleet, register_v3, lambda session: None) == ["acme/a@2"]
    with fleet.begin() as session:
        assert session.get_one(Adapter, 1).current_version_id == 3
        assert session.get_one(AdapterVersion, 2).state == VersionState.FAILED


def test_failing_a_version_waits_for_a_retirement_and_respects_it(fleet: Sessions) -> None:
    def retire_v2(session: Session) -> None:  # RetireAdapter's order: adapter, then version
        adapter = session.get_one(Adapter, 1)
        version = session.get_one(AdapterVersion, 2)
        version.state, version.retired_at = VersionState.RETIRED, NOW
        adapter.current_version_id = 1
        session.flush()

    assert race(fleet, lock_adapter, retire_v2) == []
    with fleet.begin() as session:
        assert session.get_one(AdapterVersion, 2).state == VersionState.RETIRED
        assert session.get_one(Adapter, 1).current_version_id == 1


def test_only_refusals_in_a_row_fail_a_placement_for_good(fleet: Sessions) -> None:
    store = make_store(fleet)

    def load(code: str) -> bool:
        outcome = LoadAttempt(version_id=1, engine_id=1, code=code, message="m")
        store.finish_pass({1: frozenset({1})}, PassResult({1: {}}, (outcome,)), NOW)
        with fleet.begin() as session:
            query = select(Placement).where(Placement.version_id == 1)
            return session.scalars(query).one().permanent_failure

    # Two refusals, a success, a refusal, a timeout, two refusals: never three in a row.
    for code in (
        "FAILED_PRECONDITION",
        "NOT_FOUND",
        "",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "FAILED_PRECONDITION",
        "PERMISSION_DENIED",
    ):
        assert not load(code), code
    assert load("FAILED_PRECONDITION")


def test_two_replicas_never_share_an_engine(clean_db: str, sessions: Sessions) -> None:
    now = datetime.now(UTC)
    with sessions.begin() as session:
        engines = EngineRepository(session)
        for i in range(4):
            engines.add(
                address=f"127.0.0.1:{7000 + i}",
                boot_id="b",
                model_fingerprint="f",
                registered_at=now,
                last_heartbeat_at=now,
            )
    lease = now + timedelta(seconds=30)
    with sessions.begin() as one, sessions.begin() as two:
        mine = EngineRepository(one).claim("replica-1", now, lease)
        theirs = EngineRepository(two).claim("replica-2", now, lease)  # skips locked rows
    assert sorted(mine + theirs) == [1, 2, 3, 4] and not set(mine) & set(theirs)
    with sessions.begin() as session:  # leases hold after the transactions ended
        assert EngineRepository(session).claim("replica-2", now, lease) == theirs
        assert EngineRepository(session).claim("replica-3", now, lease) == []
        later = now + timedelta(seconds=31)
        assert len(EngineRepository(session).claim("replica-3", later, later)) == 4
        assert EngineRepository(session).renew("replica-3", later + timedelta(seconds=60)) == 4
    with sessions.begin() as session:
        assert EngineRepository(session).claim("replica-1", later, later) == []
