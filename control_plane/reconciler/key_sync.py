"""Pushes the API key table to engines, apart from the Load/Evict passes.

Revoking a key or disabling a tenant must reach every engine within seconds, whatever
a pass is waiting for (one Load may take `load_timeout_s`). So the key table has its
own task: a round at once when woken (a change made through this replica) and every
`key_sync_interval_s` otherwise (changes made through other replicas, restarted
engines). A round reads the generation and the engines that may be serving, live or
stale, and pushes the table only to those whose acknowledged generation, for their
current boot id, is behind. Each push runs in its own task, so a hung engine delays
no other. Pushes need no lease: engines ignore a table older than the one they hold,
so every replica may push to every engine.

The database never lowers the generation, so one below what an engine answers or an
earlier round read means the database went back (restored from a backup). The higher
tables engines hold would then shadow the database's for ever (engines ignore a lower
generation), so the generation is moved past it (logged, audited, counted) and the
database's table goes out to every engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import grpc

from control_plane.metrics import ControlPlaneMetrics
from control_plane.reconciler.engine_client import EngineClient
from control_plane.reconciler.store import KeyTable, KeyTarget, ReconcileStore
from control_plane.reconciler.waiting import in_thread, log_failure, wait_event

log = logging.getLogger(__name__)


class KeyPusher:
    def __init__(
        self,
        store: ReconcileStore,
        client: EngineClient,
        clock: Callable[[], datetime],
        interval_s: float,
        gone_after: timedelta,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._client = client
        self._clock = clock
        self._interval_s = interval_s
        self._gone_after = gone_after
        self._wake = asyncio.Event()
        self._newest = 0  # the newest generation a round has read
        self._acked: dict[int, tuple[str, int]] = {}  # engine id -> (boot id, generation held)
        self._pushing: dict[int, asyncio.Task[None]] = {}
        self._failing: set[int] = set()  # engines whose last push failed (logged once)
        self._stopping = False

    def wake(self) -> None:
        """Start a round now. Call on the event loop's thread."""
        self._wake.set()

    def stop_soon(self) -> None:
        """No round starts after this; cancel `run` to end the one under way."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Round after round until `stop_soon` or cancelled; a failed round is logged
        and retried."""
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self.push_once()
                except Exception as exc:
                    log_failure(log, "key table round failed", exc)
                if not self._stopping:
                    await wait_event(self._wake, self._interval_s)
        finally:
            pushing = list(self._pushing.values())
            for task in pushing:
                task.cancel()
            await asyncio.gather(*pushing, return_exceptions=True)

    async def push_once(self) -> None:
        """Start a push to every engine that is behind; does not wait for the pushes."""
        generation, targets = await in_thread(
            self._store.key_targets, self._clock(), self._gone_after
        )
        if generation < self._newest:  # below an earlier read: the database went back
            await self._move_past(self._newest, "this control plane's last read")
        self._newest = max(self._newest, generation)
        known = {t.engine_id for t in targets}
        self._acked = {e: acked for e, acked in self._acked.items() if e in known}
        behind = [t for t in targets if t.engine_id not in self._pushing and self._behind(t)]
        if not behind:
            return
        # Read after the targets: at least as new as the generation they were compared to.
        table_generation, keys = await in_thread(self._store.key_table)
        self._newest = max(self._newest, table_generation)
        for target in behind:
            self._pushing[target.engine_id] = asyncio.create_task(
                self._push(target, table_generation, keys), name=f"keys-{target.address}"
            )

    def _behind(self, target: KeyTarget) -> bool:
        acked = self._acked.get(target.engine_id)
        return acked is None or acked[0] != target.boot_id or acked[1] < self._newest

    async def _push(self, target: KeyTarget, generation: int, keys: KeyTable) -> None:
        try:
            held = await self._client.sync_keys(target.address, generation, keys)
        except grpc.aio.AioRpcError as exc:
            if target.engine_id not in self._failing:
                log.warning(
                    "cannot push the key table to engine %s: %s %s",
                    target.address,
                    exc.code().name,
                    exc.details(),
                )
            self._failing.add(target.engine_id)
            return
        except Exception:
            log.exception("pushing the key table to engine %s failed", target.address)
            return
        finally:
            self._pushing.pop(target.engine_id, None)
        self._failing.discard(target.engine_id)
        self._acked[target.engine_id] = (target.boot_id, held)
        if held > generation:  # another replica's newer push, or a restored database
            await self._move_past(held, f"engine {target.address}")
        if held < self._newest:
            self._wake.set()  # the table changed while this push was in flight

    async def _move_past(self, held: int, holder: str) -> None:
        """`holder` has seen generation `held`: if the database is below it, move the
        generation past it, so the next round pushes the database's table everywhere."""
        try:
            moved = await in_thread(self._store.advance_key_generation, held, holder, self._clock())
        except Exception as exc:  # the next round or push compares again
            log_failure(log, f"cannot compare {holder}'s key table with the database", exc)
            return
        if moved is None:
            return  # the database has reached `held`: a push that lost a race
        log.warning(
            "%s saw key table generation %d, newer than the database's: the database "
            "went back (restored?); moved the generation to %d so every engine takes the "
            "database's keys",
            holder,
            held,
            moved,
        )
        if self._metrics is not None:
            self._metrics.key_generation_restores.inc()
        self._newest = max(self._newest, moved)
        self._wake.set()
