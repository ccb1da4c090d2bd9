"""The reconciler's pure planning functions: plain data in, plain data out, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from control_plane.reconciler.plan import (
    EngineView,
    Evict,
    Load,
    ObservedAdapter,
    PlacementView,
    VersionSpec,
    desired_placements,
    plan,
    retry_delay,
    versions_to_fail,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def spec(
    vid: int,
    name: str = "a",
    version: int = 1,
    *,
    current: bool = True,
    model: int = 1,
    replicas: int = 0,
) -> VersionSpec:
    return VersionSpec(
        version_id=vid,
        adapter_id=f"t/{name}@{version}",
        tenant="t",
        path=f"/r/{name}{version}",
        sha256=f"sha{vid}",
        aliases=(f"t/{name}",) if current else (),
        base_model_id=model,
        replicas=replicas,
    )


def held(s: VersionSpec, *aliases: str, evicting: bool = False) -> ObservedAdapter:
    return ObservedAdapter(s.adapter_id, frozenset(aliases), s.sha256, evicting)


def load(engine: int, s: VersionSpec, aliases: tuple[str, ...] | None = None) -> Load:
    return Load(
        engine,
        s.version_id,
        s.adapter_id,
        s.path,
        s.sha256,
        s.tenant,
        s.aliases if aliases is None else aliases,
    )


ENGINES = [
    EngineView(1, 1, True),
    EngineView(2, 1, True),
    EngineView(3, 2, True),
    EngineView(4, 1, False),
    EngineView(5, None, True),
]


def test_every_live_engine_of_the_base_model_by_default() -> None:
    a, b = spec(1), spec(2, "b", model=2)
    assert desired_placements([a, b], ENGINES, {}) == {1: {1, 2}, 2: {3}}


def test_n_replicas_go_to_the_least_loaded_and_stay_put() -> None:
    everywhere, one, two = spec(1), spec(2, "b", replicas=1), spec(3, "c", replicas=1)
    engines = [EngineView(e, 1, True) for e in (1, 2, 3)]
    desired = desired_placements([everywhere, one, two], engines, {})
    assert desired[1] == {1, 2, 3} and desired[2] == {1} and desired[3] == {2}
    # Already on engine 3: it stays there though engine 1 is as loaded.
    placed = {(2, 3): PlacementView(2, 3, desired=True)}
    assert desired_placements([one], engines, placed)[2] == {3}
    # Engine 3 went silent: the replica moves.
    moved = desired_placements([one], [EngineView(1, 1, True), EngineView(3, 1, False)], placed)
    assert moved[2] == {1}


def test_refused_for_good_is_not_desired_and_fails_only_everywhere() -> None:
    a = spec(1)
    engines = [EngineView(1, 1, True), EngineView(2, 1, True)]
    refused = {(1, 1): PlacementView(1, 1, True, 3, True, None, "FAILED_PRECONDITION: bad")}
    assert desired_placements([a], engines, refused) == {1: {2}}
    assert versions_to_fail([a], engines, refused) == {}
    both = refused | {(1, 2): PlacementView(1, 2, True, 3, True, None, "FAILED_PRECONDITION: x")}
    assert versions_to_fail([a], engines, both) == {1: "FAILED_PRECONDITION: bad"}
    assert versions_to_fail([a], [], both) == {}  # no engines: pending, not failed


def test_loads_missing_and_evicts_unwanted() -> None:
    a, b = spec(1), spec(2, "b")
    stray = ObservedAdapter("someone/else@1")
    actions = plan(
        [a, b],
        {1: frozenset({1}), 2: frozenset({1})},
        {1: {a.adapter_id: held(a, "t/a"), stray.adapter_id: stray}},
        {},
        NOW,
    )
    assert actions == [Evict(1, "someone/else@1"), load(1, b)]


def test_nothing_to_do_when_in_sync_and_unobserved_engines_are_left_alone() -> None:
    a = spec(1)
    assert plan([a], {1: frozenset({1, 2})}, {1: {a.adapter_id: held(a, "t/a")}}, {}, NOW) == []


def test_alias_moves_once_the_new_version_is_held_without_evicting_the_old() -> None:
    old, new = spec(1, version=1, current=False), spec(2, version=2)
    desired = {1: frozenset({1}), 2: frozenset({1})}
    # Pass 1: v2 loads by id; v1 keeps serving the alias meanwhile.
    first = plan([old, new], desired, {1: {old.adapter_id: held(old, "t/a")}}, {}, NOW)
    assert first == [load(1, new, ())]
    # Pass 2: v2 is held, so v1 releases the alias and v2 takes it, back to back.
    both = {old.adapter_id: held(old, "t/a"), new.adapter_id: held(new)}
    assert plan([old, new], desired, {1: both}, {}, NOW) == [load(1, old, ()), load(1, new)]
    in_sync = {old.adapter_id: held(old), new.adapter_id: held(new, "t/a")}
    assert plan([old, new], desired, {1: in_sync}, {}, NOW) == []


def test_alias_stays_on_the_old_version_while_the_new_one_backs_off() -> None:
    old, new = spec(1, version=1, current=False), spec(2, version=2)
    desired = {1: frozenset({1}), 2: frozenset({1})}
    backing_off = {(2, 1): PlacementView(2, 1, True, 2, False, NOW + timedelta(seconds=5), "x")}
    observed = {1: {old.adapter_id: held(old, "t/a")}}
    assert plan([old, new], desired, observed, backing_off, NOW) == []


def test_retiring_the_current_version_gives_the_alias_back_in_one_pass() -> None:
    old, new = spec(1, version=1), spec(2, version=2, current=False)  # v2 retired
    observed = {1: {old.adapter_id: held(old), new.adapter_id: held(new, "t/a")}}
    assert plan([old], {1: frozenset({1})}, observed, {}, NOW) == [
        Evict(1, new.adapter_id),
        load(1, old),
    ]


def test_an_alias_held_by_a_draining_adapter_waits() -> None:
    old, new = spec(1, version=1, current=False), spec(2, version=2)
    draining = {old.adapter_id: held(old, "t/a", evicting=True), new.adapter_id: held(new)}
    assert plan([new], {2: frozenset({1})}, {1: draining}, {}, NOW) == []
    assert plan([new], {2: frozenset({1})}, {1: {new.adapter_id: held(new)}}, {}, NOW) == [
        load(1, new)
    ]


def test_stale_content_is_evicted_before_reloading() -> None:
    a = spec(1)
    wrong = ObservedAdapter(a.adapter_id, frozenset({"t/a"}), "other-sha")
    assert plan([a], {1: frozenset({1})}, {1: {a.adapter_id: wrong}}, {}, NOW) == [
        Evict(1, a.adapter_id)
    ]


def test_backoff_holds_loads_until_the_retry_time() -> None:
    a = spec(1)
    waiting = {(1, 1): PlacementView(1, 1, True, 2, False, NOW + timedelta(seconds=5), "x")}
    assert plan([a], {1: frozenset({1})}, {1: {}}, waiting, NOW) == []
    later = NOW + timedelta(seconds=6)
    assert plan([a], {1: frozenset({1})}, {1: {}}, waiting, later) == [load(1, a)]


def test_retry_delay_is_exponential_and_capped() -> None:
    base, cap = timedelta(seconds=1), timedelta(seconds=30)
    assert [retry_delay(n, base, cap).total_seconds() for n in (1, 2, 3, 4, 5, 6, 99)] == [
        1,
        2,
        4,
        8,
        16,
        30,
        30,
    ]


def test_restart_reloads_everything() -> None:
    a, b = spec(1), spec(2, "b")
    desired = {1: frozenset({1}), 2: frozenset({1})}
    assert plan([a, b], desired, {1: {}}, {}, NOW) == [load(1, a), load(1, b)]
