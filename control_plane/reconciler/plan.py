"""The reconciler's decisions as pure functions of plain data: no I/O, no clock reads.

`desired_placements` says which engines should hold each active version; `plan` compares
that with what engines report and returns the Load/Evict calls to make, never one that
would give an alias to two adapters; `versions_to_fail` says which versions no eligible
engine can load.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class VersionSpec:
    version_id: int
    adapter_id: str  # "tenant/name@version"
    tenant: str
    path: str
    sha256: str
    aliases: tuple[str, ...]  # ("tenant/name",) on the current version, else ()
    base_model_id: int
    replicas: int  # 0 = every live engine of the base model
    config_sha256: str = ""  # of adapter_config.json as registered: engines check it
    chunked_sha256: str = ""  # of the weights as registered: engines check it on threads


@dataclass(frozen=True)
class EngineView:
    engine_id: int
    base_model_id: int | None
    live: bool


@dataclass(frozen=True)
class PlacementView:
    version_id: int
    engine_id: int
    desired: bool
    attempts: int = 0
    permanent_failure: bool = False
    next_retry_at: datetime | None = None
    last_error: str = ""


@dataclass(frozen=True)
class ObservedAdapter:
    adapter_id: str
    aliases: frozenset[str] = frozenset()
    sha256: str = ""
    evicting: bool = False


@dataclass(frozen=True)
class Load:
    engine_id: int
    version_id: int
    adapter_id: str
    path: str
    sha256: str
    tenant: str
    aliases: tuple[str, ...]
    config_sha256: str = ""
    chunked_sha256: str = ""


@dataclass(frozen=True)
class Evict:
    engine_id: int
    adapter_id: str


Action = Load | Evict
PlacementKey = tuple[int, int]  # (version_id, engine_id)
Desired = Mapping[int, frozenset[int]]  # version_id -> engine ids
Observed = Mapping[int, Mapping[str, ObservedAdapter]]  # engine id -> what it holds


def desired_placements(
    versions: Iterable[VersionSpec],
    engines: Iterable[EngineView],
    placements: Mapping[PlacementKey, PlacementView],
) -> dict[int, frozenset[int]]:
    """Engines each version should be on.

    Eligible: live engines of the version's base model where it has not failed for good.
    `replicas == 0` takes all of them; `replicas == N` keeps the engines already chosen
    (no churn) and fills up with the least loaded (fewest desired placements so far).
    """
    by_model: dict[int, list[int]] = {}
    for engine in sorted(engines, key=lambda e: e.engine_id):
        if engine.live and engine.base_model_id is not None:
            by_model.setdefault(engine.base_model_id, []).append(engine.engine_id)
    load: dict[int, int] = {}
    desired: dict[int, frozenset[int]] = {}
    ordered = sorted(versions, key=lambda v: v.version_id)
    # All-engine versions first: they fix the load that N-replica versions balance against.
    for spec in sorted(ordered, key=lambda v: v.replicas != 0):
        eligible = [
            e
            for e in by_model.get(spec.base_model_id, [])
            if not _failed_for_good(placements.get((spec.version_id, e)))
        ]
        if spec.replicas == 0 or spec.replicas >= len(eligible):
            chosen = eligible
        else:
            kept = [e for e in eligible if _wanted(placements.get((spec.version_id, e)))]
            kept = kept[: spec.replicas]
            rest = sorted((e for e in eligible if e not in kept), key=lambda e: (load.get(e, 0), e))
            chosen = kept + rest[: spec.replicas - len(kept)]
        for e in chosen:
            load[e] = load.get(e, 0) + 1
        desired[spec.version_id] = frozenset(chosen)
    return desired


def plan(
    versions: Iterable[VersionSpec],
    desired: Desired,
    observed: Observed,
    placements: Mapping[PlacementKey, PlacementView],
    now: datetime,
) -> list[Action]:
    """Calls that bring each observed engine closer to its desired set.

    Per engine, in order: evictions (not wanted, or other content; the engine frees
    their aliases at once), alias releases (a wanted adapter holding an alias whose new
    owner is already held here is loaded again with the aliases it keeps: a load
    declares the whole alias set), then loads. Engines
    absent from `observed` (unreachable, or reconciled by another replica) get nothing.
    A load carries only the aliases no other adapter holds after the releases (an
    adapter still reported holding one keeps it); the rest follow on a later pass, so no
    call is one the engine would refuse for a name conflict. A load waits while its
    placement is backing off; a release never does (it reads no file).
    """
    specs = list(versions)
    actions: list[Action] = []
    for engine_id in sorted(observed):
        want = {s.adapter_id: s for s in specs if engine_id in desired.get(s.version_id, ())}
        engine = _EnginePlan(engine_id, want, observed[engine_id])
        evictions = engine.evictions()
        releases = engine.releases()
        evicted = {e.adapter_id for e in evictions}
        actions += evictions + releases + engine.loads(evicted, placements, now)
    return actions


class _EnginePlan:
    """One engine's calls, planned step by step: each step sees which adapter holds each
    alias once the calls of the steps before have run."""

    def __init__(
        self, engine_id: int, want: Mapping[str, VersionSpec], have: Mapping[str, ObservedAdapter]
    ) -> None:
        self.engine_id = engine_id
        self.want = want  # adapter id -> spec, for the versions desired here
        self.have = have  # what the engine reports holding
        self.owner = {alias: a for a, seen in have.items() for alias in seen.aliases}
        self.aliases = {a: seen.aliases for a, seen in have.items()}  # held adapter -> aliases
        # Aliases a wanted adapter should give up but keeps until their new owner is here.
        self.held_back: dict[str, tuple[str, ...]] = {}

    def evictions(self) -> list[Action]:
        """Adapters held here that are not wanted, or wanted with other content; their
        aliases are free once the calls run (an engine frees them as it evicts)."""
        evictions: list[Action] = []
        for adapter_id in sorted(self.have):
            seen = self.have[adapter_id]
            if not seen.evicting and _stale(self.want.get(adapter_id), seen):
                evictions.append(Evict(self.engine_id, adapter_id))
                for alias in seen.aliases:
                    del self.owner[alias]
        return evictions

    def releases(self) -> list[Action]:
        """Loads again, with the aliases they keep, the wanted adapters held here that
        should give up an alias whose new owner can take it now."""
        releases: list[Action] = []
        for adapter_id in sorted(self.have):
            seen = self.have[adapter_id]
            spec = self.want.get(adapter_id)
            if spec is None or seen.evicting or _stale(spec, seen):
                continue
            # An alias this adapter should give up is kept until its new owner is held
            # here, so the name never points at nothing while the new version loads.
            kept = tuple(
                a
                for a in sorted(seen.aliases)
                if a in spec.aliases or not _can_take(self.want, self.have, a)
            )
            self.held_back[adapter_id] = tuple(a for a in kept if a not in spec.aliases)
            if frozenset(kept) != seen.aliases:
                for alias in seen.aliases - frozenset(kept):
                    del self.owner[alias]
                self.aliases[adapter_id] = frozenset(kept)
                releases.append(_load(self.engine_id, spec, kept))
        return releases

    def loads(
        self,
        evicted: set[str],
        placements: Mapping[PlacementKey, PlacementView],
        now: datetime,
    ) -> list[Action]:
        """Loads of the wanted adapters not held here, or held without every alias they
        may take now; `evicted` ones wait until the engine has let go of them."""
        loads: list[Action] = []
        for adapter_id in sorted(self.want):
            spec = self.want[adapter_id]
            seen = self.have.get(adapter_id)
            if adapter_id in evicted or (seen is not None and seen.evicting):
                continue  # loaded again once the engine has let go of it
            free = tuple(a for a in spec.aliases if self.owner.get(a, adapter_id) == adapter_id)
            free += self.held_back.get(adapter_id, ())
            if seen is not None and frozenset(free) == self.aliases[adapter_id]:
                continue
            # Backoff holds loads that read the adapter; an alias change reads nothing.
            placement = placements.get((spec.version_id, self.engine_id))
            if seen is None and _backing_off(placement, now):
                continue
            for alias in free:
                self.owner[alias] = adapter_id
            loads.append(_load(self.engine_id, spec, free))
        return loads


def _stale(spec: VersionSpec | None, seen: ObservedAdapter) -> bool:
    """Whether a held adapter is not wanted here, or is held with other content."""
    return spec is None or bool(seen.sha256 and seen.sha256 != spec.sha256)


def _can_take(
    want: Mapping[str, VersionSpec], have: Mapping[str, ObservedAdapter], alias: str
) -> bool:
    """Whether the adapter that should hold `alias` here can take it now: it is held
    with the right content and not draining (or no adapter should hold it at all)."""
    owner = next((s for s in want.values() if alias in s.aliases), None)
    if owner is None:
        return True
    seen = have.get(owner.adapter_id)
    return seen is not None and not seen.evicting and seen.sha256 in ("", owner.sha256)


def _load(engine_id: int, spec: VersionSpec, aliases: tuple[str, ...]) -> Load:
    return Load(
        engine_id,
        spec.version_id,
        spec.adapter_id,
        spec.path,
        spec.sha256,
        spec.tenant,
        aliases,
        spec.config_sha256,
        spec.chunked_sha256,
    )


def versions_to_fail(
    versions: Iterable[VersionSpec],
    engines: Iterable[EngineView],
    placements: Mapping[PlacementKey, PlacementView],
) -> dict[int, str]:
    """`{version_id: reason}` for versions every eligible engine refused for good."""
    live_by_model: dict[int, list[int]] = {}
    for engine in engines:
        if engine.live and engine.base_model_id is not None:
            live_by_model.setdefault(engine.base_model_id, []).append(engine.engine_id)
    failed: dict[int, str] = {}
    for spec in versions:
        eligible = sorted(live_by_model.get(spec.base_model_id, []))
        found = [placements.get((spec.version_id, e)) for e in eligible]
        if eligible and all(_failed_for_good(p) for p in found):
            reasons = [p.last_error for p in found if p is not None and p.last_error]
            failed[spec.version_id] = reasons[0] if reasons else "no engine could load it"
    return failed


def retry_delay(attempts: int, base: timedelta, cap: timedelta) -> timedelta:
    """Exponential backoff after the `attempts`-th consecutive failure (1 = first)."""
    return min(cap, base * (2 ** max(0, min(attempts - 1, 30))))


def _failed_for_good(placement: PlacementView | None) -> bool:
    return placement is not None and placement.permanent_failure


def _wanted(placement: PlacementView | None) -> bool:
    return placement is not None and placement.desired


def _backing_off(placement: PlacementView | None, now: datetime) -> bool:
    return (
        placement is not None
        and placement.next_retry_at is not None
        and placement.next_retry_at > now
    )
