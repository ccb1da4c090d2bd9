"""The reconciler's loop: a pass every interval, and at once when nudged after a change.

A pass: lease engines (store) → push the key table and read what each engine holds
(EngineAdmin) → `desired_placements` + `plan` (pure) → Load/Evict calls → record
outcomes, backoff and failures (store). Database work runs in threads; engine calls
run concurrently across engines and in plan order within one engine.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import grpc

from control_plane.metrics import ControlPlaneMetrics
from control_plane.reconciler.engine_client import EngineClient
from control_plane.reconciler.plan import (
    Action,
    Evict,
    Load,
    ObservedAdapter,
    desired_placements,
    plan,
)
from control_plane.reconciler.store import LoadOutcome, PassResult, ReconcileStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcilerConfig:
    interval_s: float = 2.0
    heartbeat_timeout_s: float = 10.0
    lease_s: float = 30.0
    retry_base_s: float = 1.0
    retry_cap_s: float = 60.0
    # A load refused with one of these codes this many times in a row is final.
    fail_after_attempts: int = 3
    permanent_codes: frozenset[str] = frozenset(
        {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED"}
    )
    rpc_timeout_s: float = 10.0
    load_timeout_s: float = 120.0
    owner: str = field(default_factory=lambda: f"cp-{uuid.uuid4().hex[:12]}")


@dataclass(frozen=True)
class PassReport:
    engines_reached: int
    actions: tuple[Action, ...]
    failed_loads: int
    failed_versions: tuple[str, ...]


class Reconciler:
    def __init__(
        self, config: ReconcilerConfig, store: ReconcileStore, client: EngineClient,
        clock: Callable[[], datetime], metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics if metrics is not None else ControlPlaneMetrics()
        self._store = store
        self._client = client
        self._clock = clock
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pass_lock = asyncio.Lock()

    def nudge(self) -> None:
        """Ask for a pass soon. Safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:
            pass  # the loop is shutting down

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def run(self) -> None:
        """Pass after pass until cancelled; a failed pass is logged and retried later."""
        self.bind(asyncio.get_running_loop())
        try:
            while True:
                self._wake.clear()
                try:
                    await self.reconcile_once()
                except Exception:
                    log.exception("reconcile pass failed")
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._config.interval_s)
                except TimeoutError:
                    pass
        finally:
            await asyncio.shield(asyncio.to_thread(self._store.release, self._config.owner))

    async def reconcile_once(self) -> PassReport:
        async with self._pass_lock:
            with self._metrics.timed_pass():
                return await self._pass()

    async def _pass(self) -> PassReport:
        now = self._clock()
        snapshot, stale = await asyncio.to_thread(self._store.begin_pass, self._config.owner, now)
        for address in stale:
            log.warning("engine %s missed its heartbeats; nothing is placed on it", address)
        observed: dict[int, dict[str, ObservedAdapter]] = {}

        async def observe(engine_id: int, address: str) -> None:
            try:
                await self._client.sync_keys(address, snapshot.key_generation, snapshot.keys)
                observed[engine_id] = await self._client.list_adapters(address)
            except grpc.aio.AioRpcError as exc:
                log.warning("engine %s unreachable: %s %s", address, exc.code().name,
                            exc.details())

        await asyncio.gather(*(observe(e, a) for e, a in snapshot.addresses.items()))
        desired = desired_placements(snapshot.versions, snapshot.engines, snapshot.placements)
        actions = plan(snapshot.versions, desired, observed, snapshot.placements, now)
        by_engine: dict[int, list[Action]] = {}
        for action in actions:
            by_engine.setdefault(action.engine_id, []).append(action)
        results = await asyncio.gather(*(
            self._apply(snapshot.addresses[e], steps, observed[e])
            for e, steps in by_engine.items()
        ))
        loads = tuple(o for outcomes, _ in results for o in outcomes)
        evictions = sum(n for _, n in results)
        failed_versions = await asyncio.to_thread(
            self._store.finish_pass, desired, PassResult(observed=observed, loads=loads),
            self._clock(),
        )
        if failed_versions:
            log.warning("versions no engine can load, marked failed: %s", failed_versions)
        if failed_versions or evictions:
            # Aliases moved or were freed: the follow-up loads belong to the next pass.
            self.nudge()
        failed_loads = sum(1 for o in loads if o.code)
        return PassReport(len(observed), tuple(actions), failed_loads, tuple(failed_versions))

    async def _apply(
        self, address: str, steps: list[Action], held: dict[str, ObservedAdapter]
    ) -> tuple[list[LoadOutcome], int]:
        """Run one engine's steps in order; evictions update `held` in place.

        Returns the load outcomes and the number of successful evictions.
        """
        outcomes = []
        evictions = 0
        for step in steps:
            if isinstance(step, Evict):
                code, message = await self._client.evict(address, step.adapter_id)
                if code:
                    log.warning("evict %s on %s failed: %s %s", step.adapter_id, address,
                                code, message)
                else:
                    held.pop(step.adapter_id, None)
                    evictions += 1
            elif isinstance(step, Load):
                code, message = await self._client.load(address, step)
                if code:
                    log.warning("load %s on %s failed: %s %s", step.adapter_id, address,
                                code, message)
                outcomes.append(LoadOutcome(step.version_id, step.engine_id, code, message))
        return outcomes, evictions
