"""Limits on verifying API keys, shared by engines and the control plane.

scrypt is slow on purpose (tens of milliseconds and 16 MiB per run), so a caller who
sends wrong secrets makes the server pay for each one. `KeyGuard` bounds that cost:

- per key id and per peer (the caller's address), at most `failures_per_key` /
  `failures_per_peer` failed verifications in a window of `window_s` seconds; past it,
  an attempt is refused (`TooManyFailures`) before scrypt runs. Verifications still
  running count as failures until they succeed, so a burst cannot slip past the limit.
- scrypt runs on the guard's own small thread pool with a bounded queue; when it is
  full an attempt is refused (`VerifierBusy`) instead of waiting, so a flood of wrong
  secrets never holds the threads that tokenize prompts, read adapters or talk to the
  database.

Verdicts that are already known (cached by the caller) need no scrypt and are not
limited here: a key that was once accepted keeps working during a flood.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from loraplex.keys import verify_secret


@dataclass(frozen=True)
class GuardLimits:
    failures_per_key: int = 10
    # Higher than per key: many clients may share one address (a NAT, a proxy).
    failures_per_peer: int = 50
    window_s: float = 60.0
    workers: int = 2  # scrypt threads
    max_queued: int = 8  # verifications waiting for a thread beyond the running ones
    max_tracked: int = 100_000  # key ids and peers remembered (bounded memory)


class TooManyFailures(Exception):
    """Too many failed verifications for this key id or from this peer lately."""

    def __init__(self, subject: str, retry_after_s: float) -> None:
        self.subject = subject  # "API key <id>" or "this address"
        self.retry_after_s = retry_after_s
        super().__init__(
            f"too many failed attempts for {subject}; retry in {max(1, round(retry_after_s))}s"
        )


class VerifierBusy(Exception):
    """Every scrypt thread is busy and the queue is full."""

    def __init__(self) -> None:
        super().__init__("too many API keys are being verified at once; retry in a moment")


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (`ipv4:1.2.3.4:5678` -> `1.2.3.4`,
    `ipv6:[::1]:5678` -> `::1`); other forms (unix sockets) are kept whole."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] if rest.startswith("[") else rest
        return host.strip("[]")
    return peer


class _Windows:
    """Fixed windows of failure counts per name. Not thread-safe: KeyGuard locks."""

    def __init__(self, limit: int, window_s: float, max_tracked: int) -> None:
        self._limit = limit
        self._window_s = window_s
        self._max_tracked = max_tracked
        self._counts: dict[str, tuple[float, int]] = {}  # name -> (window start, count)

    def retry_after(self, name: str, now: float) -> float:
        """0 when `name` may try now, else the seconds until its window ends."""
        start, count = self._counts.get(name, (now, 0))
        if now - start >= self._window_s or count < self._limit:
            return 0.0
        return start + self._window_s - now

    def reserve(self, name: str, now: float) -> float:
        """Count one attempt as failed; returns its window, for `release`."""
        start, count = self._counts.pop(name, (now, 0))
        if now - start >= self._window_s:
            start, count = now, 0
        self._counts[name] = (start, count + 1)  # re-inserted: the newest at the end
        if len(self._counts) > self._max_tracked:
            self._forget(now)
        return start

    def release(self, name: str, window: float) -> None:
        """The attempt reserved in `window` succeeded: it is not a failure."""
        start, count = self._counts.get(name, (None, 0))
        if start == window and count > 0:
            self._counts[name] = (start, count - 1)

    def _forget(self, now: float) -> None:
        live = {n: c for n, c in self._counts.items() if now - c[0] < self._window_s}
        while len(live) > self._max_tracked // 2:  # the oldest windows go first
            live.pop(next(iter(live)))
        self._counts = live


class KeyGuard:
    """Rate limits and the bounded scrypt pool for one server. Thread-safe."""

    def __init__(
        self, limits: GuardLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or GuardLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._keys = _Windows(
            self.limits.failures_per_key, self.limits.window_s, self.limits.max_tracked
        )
        self._peers = _Windows(
            self.limits.failures_per_peer, self.limits.window_s, self.limits.max_tracked
        )
        self._capacity = self.limits.workers + self.limits.max_queued
        self._in_pool = 0
        self._running: dict[bytes, Future[bool]] = {}  # verifications in progress, by key
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="scrypt")
        self.num_verifications = 0  # scrypt runs started, for metrics and tests

    def check(self, key_id: str, peer: str) -> None:
        """Raises TooManyFailures when `key_id` or `peer` is over its limit now."""
        with self._lock:
            self._check(key_id, peer, self._clock())

    def submit(self, secret: str, encoded: str, key_id: str, peer: str) -> Future[bool]:
        """Starts `verify_secret(secret, encoded)` on the pool; its future's result is the
        verdict. Raises TooManyFailures or VerifierBusy instead of starting it."""
        # Concurrent presentations of one key (a client opening many streams with a key
        # the server has not verified yet) share one run instead of each taking a place.
        run = hashlib.sha256(f"{encoded}\x00{secret}".encode()).digest()
        with self._lock:
            shared = self._running.get(run)
            if shared is not None:
                return shared
            now = self._clock()
            self._check(key_id, peer, now)
            if self._in_pool >= self._capacity:
                raise VerifierBusy()
            self._in_pool += 1
            self.num_verifications += 1
            key_window = self._keys.reserve(key_id, now)
            peer_window = self._peers.reserve(peer, now)
            future = self._pool.submit(verify_secret, secret, encoded)
            self._running[run] = future

        def done(finished: Future[bool]) -> None:
            with self._lock:
                self._running.pop(run, None)
                self._in_pool -= 1
                if not finished.cancelled() and finished.exception() is None and finished.result():
                    self._keys.release(key_id, key_window)
                    self._peers.release(peer, peer_window)

        future.add_done_callback(done)
        return future

    def _check(self, key_id: str, peer: str, now: float) -> None:
        wait = self._keys.retry_after(key_id, now)
        if wait:
            raise TooManyFailures(f"API key {key_id}", wait)
        wait = self._peers.retry_after(peer, now)
        if wait:
            raise TooManyFailures("API keys from this address", wait)
