"""The engine's table of accepted API keys, pushed by the control plane (SyncApiKeys).

The token path never calls the database: `authenticate` checks a presented key against
the last table the control plane pushed. Each distinct presented key is verified with
scrypt once; the verdict is cached in memory, keyed by the sha256 of the presented key,
and dropped when a later sync changes or removes that key's entry. scrypt runs on the
`KeyGuard`'s own bounded pool, behind per-key-id and per-peer limits on failures
(`loraplex.key_guard`), so wrong secrets cannot take the threads other work needs.

Under a control plane the table is trusted for `ttl_s` seconds after the last word
from it (a push, or an answered heartbeat: `touch`); past that, keys are refused with
UNAVAILABLE, since a revocation may have been missed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter

from engine.server.statuses import Refused
from loraplex.bearer import bearer_token
from loraplex.key_guard import KeyGuard, TooManyFailures, VerifierBusy, peer_host
from loraplex.keys import KeyFormatError, parse_key

log = logging.getLogger(__name__)

# Bound on cached verdicts for keys that failed verification: enough to absorb a flood of
# bad keys without re-running scrypt for each, small enough not to grow without limit.
_MAX_NEGATIVE_VERDICTS = 10_000


class AuthError(Refused):
    """A request's credentials are refused; `code` is the gRPC status to answer with."""


class KeyEntry(Protocol):
    """What `sync` reads from each entry (the proto `ApiKeyEntry` fits)."""

    key_id: str
    secret_hash: str
    tenant: str


class KeyMetrics:
    """Counters of the key table, in the engine's registry (or a private one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        p = "loraplex_engine_"
        self.verifications = Counter(
            p + "key_verifications",
            "scrypt verifications of API keys, by outcome",
            ["outcome"],
            registry=r,
        )
        self.refused = Counter(
            p + "key_attempts_refused",
            "API keys refused before verification: too_many_failures, verifier_busy, table_expired",
            ["reason"],
            registry=r,
        )
        self.older_tables = Counter(
            p + "key_table_older_pushes",
            "Key tables pushed with a generation below the one held (ignored): a push "
            "that lost a race, or the control plane's database went back",
            registry=r,
        )


@dataclass(frozen=True)
class _Entry:
    secret_hash: str
    tenant: str


@dataclass(frozen=True)
class _Pending:
    """A presented key that needs scrypt."""

    key_id: str
    secret: str
    digest: bytes
    entry: _Entry


class ApiKeyTable:
    """Thread-safe table of accepted keys.

    Not enforcing until the first `sync` (an engine run without a control plane accepts
    every caller) unless built with `enforcing=True`, which refuses every key until the
    first table arrives - the right start for an engine under a control plane.
    `ttl_s` None: the table never expires (no control plane to lose).
    """

    def __init__(
        self,
        enforcing: bool = False,
        *,
        ttl_s: float | None = None,
        guard: KeyGuard | None = None,
        metrics: KeyMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._enforcing = enforcing
        self._synced = False
        self._generation = 0
        self._entries: dict[str, _Entry] = {}
        # sha256(presented key) -> (key_id, entry it was verified against, verdict)
        self._verdicts: dict[bytes, tuple[str, _Entry, bool]] = {}
        self._num_negative = 0
        self._last_used: dict[str, float] = {}
        self._ttl_s = ttl_s
        self._clock = clock
        self._heard_at = clock()
        self.guard = guard or KeyGuard()
        self.metrics = metrics or KeyMetrics()

    @property
    def enforcing(self) -> bool:
        return self._enforcing

    @property
    def generation(self) -> int:
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    def touch(self) -> None:
        """The control plane answered: the table held is still trusted for `ttl_s`."""
        self._heard_at = self._clock()

    def sync(self, entries: Iterable[KeyEntry], generation: int) -> int:
        """Replace the table unless `generation` is older than (or equal to) the one held.

        Returns the generation held afterwards. The first sync turns enforcement on. An
        older generation is logged and counted: the control plane compares the answer
        with its database and, if its database went back, moves past it (key_sync).
        """
        fresh = {e.key_id: _Entry(e.secret_hash, e.tenant) for e in entries}
        self.touch()
        with self._lock:
            if self._synced and generation <= self._generation:
                if generation < self._generation:
                    self.metrics.older_tables.inc()
                    log.warning(
                        "ignored a key table of generation %d: this engine holds %d (a push "
                        "that lost a race, or the control plane's database was restored)",
                        generation,
                        self._generation,
                    )
                return self._generation
            self._entries = fresh
            self._generation = generation
            self._enforcing = True
            self._synced = True
            self._verdicts = {
                digest: cached
                for digest, cached in self._verdicts.items()
                if fresh.get(cached[0]) == cached[1]
            }
            self._num_negative = sum(1 for c in self._verdicts.values() if not c[2])
            return self._generation

    def authenticate(self, authorization: str | None, peer: str = "") -> str | None:
        """Return the tenant of the presented key, or None when keys are not enforced.

        `authorization` is the raw metadata value (`Bearer <key>`), `peer` the gRPC peer.
        Raises AuthError: UNAUTHENTICATED for a missing, malformed, unknown or revoked
        key; RESOURCE_EXHAUSTED after too many failures for the key id or the peer;
        UNAVAILABLE when the scrypt pool is full or the table has expired. Blocks while
        scrypt runs: call it from a worker thread, or use `authenticate_async`.
        """
        step = self._begin(authorization)
        if not isinstance(step, _Pending):
            return step
        return self._finish(step, self._submit(step, peer).result())

    async def authenticate_async(self, authorization: str | None, peer: str = "") -> str | None:
        """`authenticate` for the event loop: the fast checks inline, scrypt awaited on
        the guard's pool (no thread of the loop's default executor is held)."""
        step = self._begin(authorization)
        if not isinstance(step, _Pending):
            return step
        return self._finish(step, await asyncio.wrap_future(self._submit(step, peer)))

    def drain_usage(self) -> dict[str, float]:
        """Return and forget `{key_id: unix time of last use}` since the previous call."""
        with self._lock:
            used, self._last_used = self._last_used, {}
        return used

    def _begin(self, authorization: str | None) -> str | None | _Pending:
        """The answer when no scrypt is needed (tenant, None, or AuthError), else what
        scrypt must check."""
        if not self._enforcing:
            return None
        self._check_fresh()
        key = _api_key(authorization)
        try:
            parsed = parse_key(key)
        except KeyFormatError as exc:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"malformed API key: {exc}") from exc
        digest = hashlib.sha256(key.encode()).digest()
        with self._lock:
            entry = self._entries.get(parsed.key_id)
            cached = self._verdicts.get(digest)
        if entry is None:
            raise _refused(parsed.key_id)
        if cached is not None and cached[1] == entry:
            if not cached[2]:
                raise _refused(parsed.key_id)
            return self._accepted(parsed.key_id, entry)
        return _Pending(parsed.key_id, parsed.secret, digest, entry)

    def _check_fresh(self) -> None:
        if self._ttl_s is None or not self._synced:
            return
        silent_s = self._clock() - self._heard_at
        if silent_s > self._ttl_s:
            self.metrics.refused.labels("table_expired").inc()
            raise AuthError(
                grpc.StatusCode.UNAVAILABLE,
                f"this engine has not heard from its control plane for {silent_s:.0f} s "
                f"(more than --key-table-ttl {self._ttl_s:.0f} s), so it cannot tell "
                "whether API keys are still valid; retry later or on another engine",
            )

    def _submit(self, step: _Pending, peer: str) -> Future[bool]:
        try:
            return self.guard.submit(
                step.secret, step.entry.secret_hash, step.key_id, peer_host(peer)
            )
        except TooManyFailures as exc:
            self.metrics.refused.labels("too_many_failures").inc()
            raise AuthError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except VerifierBusy as exc:
            self.metrics.refused.labels("verifier_busy").inc()
            raise AuthError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc

    def _finish(self, step: _Pending, verdict: bool) -> str:
        self.metrics.verifications.labels("accepted" if verdict else "refused").inc()
        self._remember(step.digest, step.key_id, step.entry, verdict)
        if not verdict:
            raise _refused(step.key_id)
        return self._accepted(step.key_id, step.entry)

    def _accepted(self, key_id: str, entry: _Entry) -> str:
        with self._lock:
            self._last_used[key_id] = time.time()
        return entry.tenant

    def _remember(self, digest: bytes, key_id: str, entry: _Entry, verdict: bool) -> None:
        with self._lock:
            if self._entries.get(key_id) != entry:
                return  # a sync replaced the entry while scrypt ran; do not cache a stale verdict
            if not verdict:
                if self._num_negative >= _MAX_NEGATIVE_VERDICTS:
                    self._verdicts = {d: c for d, c in self._verdicts.items() if c[2]}
                    self._num_negative = 0
                self._num_negative += 1
            self._verdicts[digest] = (key_id, entry, verdict)


def _api_key(authorization: str | None) -> str:
    """The key of a `Bearer <api key>` value; AuthError when there is none."""
    if not authorization:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing credentials: send metadata 'authorization: Bearer <api key>'",
        )
    key = bearer_token(authorization)
    if not key:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "malformed authorization metadata: expected 'Bearer <api key>'",
        )
    return key


def _refused(key_id: str) -> AuthError:
    return AuthError(
        grpc.StatusCode.UNAUTHENTICATED,
        f"API key {key_id} is not accepted: it is unknown, revoked, or its tenant is disabled",
    )
