"""The reconciler's loop: a pass every interval, and at once when nudged after a change.

A pass: lease engines (store) → read what each engine holds (EngineAdmin) →
`desired_placements` + `plan` (pure) → Load/Evict calls → record outcomes, backoff and
failures (store). Database work runs in threads; engine calls run concurrently across
engines and in plan order within one engine. Beside the passes run two tasks: the key
table pushes (key_sync.py), so a revocation never waits for a slow Load, and the lease
renewals, so a long pass keeps its engines.

Stopping (`stop_soon`, then cancelling `run`) ends the loops for sure, and only once the
database work under way has finished (waiting.py says why both need care).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc

from control_plane.metrics import ControlPlaneMetrics
from control_plane.reconciler.config import ReconcilerConfig
from control_plane.reconciler.engine_client import EngineClient
from control_plane.reconciler.key_sync import KeyPusher
from control_plane.reconciler.plan import (
    Action,
    Evict,
    Load,
    ObservedAdapter,
    desired_placements,
    plan,
)
from control_plane.reconciler.store import LoadAttempt, PassResult, ReconcileStore
from control_plane.reconciler.waiting import in_thread, log_failure, wait_event

__all__ = ["PassReport", "Reconciler"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassReport:
    engines_reached: int
    actions: tuple[Action, ...]
    failed_loads: int
    failed_versions: tuple[str, ...]


class Reconciler:
    def __init__(
        self,
        config: ReconcilerConfig,
        store: ReconcileStore,
        client: EngineClient,
        clock: Callable[[], datetime],
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics if metrics is not None else ControlPlaneMetrics()
        self._store = store
        self._client = client
        self._clock = clock
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pass_lock = asyncio.Lock()
        self._keys = KeyPusher(
            store,
            client,
            clock,
            config.key_sync_interval_s,
            timedelta(seconds=config.gone_after_s),
            self._metrics,
        )
        # time.monotonic() when the leases this replica last wrote run out.
        self._lease_deadline = 0.0
        self._stopping = False

    def nudge(self) -> None:
        """Ask for a key table round and a pass soon. Safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._wake_all)
        except RuntimeError:
            pass  # the loop is shutting down

    def _wake_all(self) -> None:
        self._wake.set()
        self._keys.wake()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def stop_soon(self) -> None:
        """No pass starts after this one; cancel `run` to cut the current pass short.
        Call on the event loop's thread."""
        self._stopping = True
        self._keys.stop_soon()
        self._wake_all()

    async def run(self) -> None:
        """Pass after pass until `stop_soon` or cancelled; a failed pass is logged and
        retried later. On the way out the leases are released if the database answers
        (else they run out after `lease_s`)."""
        self.bind(asyncio.get_running_loop())
        helpers = [
            asyncio.create_task(self._keys.run(), name="key-sync"),
            asyncio.create_task(self._renew_leases(), name="lease-renewal"),
        ]
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self.reconcile_once()
                except Exception as exc:
                    log_failure(log, "reconcile pass failed", exc)
                if not self._stopping:
                    await wait_event(self._wake, self._config.interval_s)
        finally:
            self._stopping = True
            self._keys.stop_soon()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            try:
                await in_thread(self._store.release, self._config.owner)
            except Exception as exc:
                log_failure(log, "cannot release engine leases; they run out on their own", exc)

    async def _renew_leases(self) -> None:
        """Renew this replica's leases every `lease_s / 3`, in and between passes."""
        while True:
            await asyncio.sleep(self._config.renew_every_s)
            started = time.monotonic()
            try:
                await in_thread(self._store.renew, self._config.owner, self._clock())
            except Exception as exc:
                log_failure(log, "cannot renew engine leases; calls stop before they lapse", exc)
                continue
            self._lease_deadline = max(self._lease_deadline, started + self._config.lease_s)

    async def reconcile_once(self) -> PassReport:
        async with self._pass_lock:
            with self._metrics.timed_pass():
                return await self._pass()

    async def _pass(self) -> PassReport:
        now = self._clock()
        started = time.monotonic()
        snapshot, stale = await in_thread(self._store.begin_pass, self._config.owner, now)
        self._lease_deadline = max(self._lease_deadline, started + self._config.lease_s)
        for address in stale:
            log.warning("engine %s missed its heartbeats; nothing is placed on it", address)
        observed: dict[int, dict[str, ObservedAdapter]] = {}

        async def observe(engine_id: int, address: str) -> None:
            try:
                observed[engine_id] = await self._client.list_adapters(address)
            except grpc.aio.AioRpcError as exc:
                log.warning("engine %s unreachable: %s %s", address, exc.code().name, exc.details())

        await asyncio.gather(*(observe(e, a) for e, a in snapshot.addresses.items()))
        desired = desired_placements(snapshot.versions, snapshot.engines, snapshot.placements)
        actions = plan(snapshot.versions, desired, observed, snapshot.placements, now)
        by_engine: dict[int, list[Action]] = {}
        for action in actions:
            by_engine.setdefault(action.engine_id, []).append(action)
        results = await asyncio.gather(
            *(
                self._apply(snapshot.addresses[e], steps, observed[e])
                for e, steps in by_engine.items()
            )
        )
        loads = tuple(o for outcomes, _ in results for o in outcomes)
        evictions = sum(n for _, n in results)
        failed_versions = await in_thread(
            self._store.finish_pass,
            desired,
            PassResult(observed=observed, loads=loads),
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
    ) -> tuple[list[LoadAttempt], int]:
        """Run one engine's steps in order; evictions update `held` in place.

        A step starts only if this replica's lease outlasts the call (renewals can fail
        when the database is out of reach); the steps left over wait for a later pass.
        Returns the load outcomes and the number of successful evictions.
        """
        outcomes = []
        evictions = 0
        for done, step in enumerate(steps):
            timeout = (
                self._config.load_timeout_s
                if isinstance(step, Load)
                else self._config.rpc_timeout_s
            )
            if time.monotonic() + timeout > self._lease_deadline:
                log.warning(
                    "the lease on %s could lapse during the next call; %d calls "
                    "wait for a later pass",
                    address,
                    len(steps) - done,
                )
                break
            if isinstance(step, Evict):
                code, message = await self._client.evict(address, step.adapter_id)
                if code:
                    log.warning(
                        "evict %s on %s failed: %s %s", step.adapter_id, address, code, message
                    )
                else:
                    held.pop(step.adapter_id, None)
                    evictions += 1
            elif isinstance(step, Load):
                code, message = await self._client.load(address, step)
                if code:
                    log.warning(
                        "load %s on %s failed: %s %s", step.adapter_id, address, code, message
                    )
                outcomes.append(LoadAttempt(step.version_id, step.engine_id, code, message))
        return outcomes, evictions
