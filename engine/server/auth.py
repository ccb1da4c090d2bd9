"""The engine's table of accepted API keys, pushed by the control plane (SyncApiKeys).

The token path never calls the database: `authenticate` checks a presented key against
the last table the control plane pushed. Each distinct presented key is verified with
scrypt once; the verdict is cached in memory, keyed by the sha256 of the presented key,
and dropped when a later sync changes or removes that key's entry.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import grpc

from loraplex.keys import KeyFormatError, parse_key, verify_secret

# Bound on cached verdicts for keys that failed verification: enough to absorb a flood of
# bad keys without re-running scrypt for each, small enough not to grow without limit.
_MAX_NEGATIVE_VERDICTS = 10_000


class AuthError(Exception):
    """A request's credentials are refused; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class KeyEntry(Protocol):
    """What `sync` reads from each entry (the proto `ApiKeyEntry` fits)."""

    key_id: str
    secret_hash: str
    tenant: str


@dataclass(frozen=True)
class _Entry:
    secret_hash: str
    tenant: str


class ApiKeyTable:
    """Thread-safe table of accepted keys.

    Not enforcing until the first `sync` (an engine run without a control plane accepts
    every caller) unless built with `enforcing=True`, which refuses every key until the
    first table arrives - the right start for an engine under a control plane.
    """

    def __init__(self, enforcing: bool = False) -> None:
        self._lock = threading.Lock()
        self._enforcing = enforcing
        self._synced = False
        self._generation = 0
        self._entries: dict[str, _Entry] = {}
        # sha256(presented key) -> (key_id, entry it was verified against, verdict)
        self._verdicts: dict[bytes, tuple[str, _Entry, bool]] = {}
        self._num_negative = 0
        self._last_used: dict[str, float] = {}

    @property
    def enforcing(self) -> bool:
        return self._enforcing

    @property
    def generation(self) -> int:
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    def sync(self, entries: Iterable[KeyEntry], generation: int) -> int:
        """Replace the table unless `generation` is older than (or equal to) the one held.

        Returns the generation held afterwards. The first sync turns enforcement on.
        """
        fresh = {e.key_id: _Entry(e.secret_hash, e.tenant) for e in entries}
        with self._lock:
            if self._synced and generation <= self._generation:
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

    def authenticate(self, authorization: str | None) -> str | None:
        """Return the tenant of the presented key, or None when keys are not enforced.

        `authorization` is the raw metadata value (`Bearer <key>`). Raises AuthError
        (UNAUTHENTICATED) for a missing, malformed, unknown or revoked key.
        """
        if not self._enforcing:
            return None
        key = _bearer_token(authorization)
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
            verdict = cached[2]
        else:
            verdict = verify_secret(parsed.secret, entry.secret_hash)  # slow, outside the lock
            self._remember(digest, parsed.key_id, entry, verdict)
        if not verdict:
            raise _refused(parsed.key_id)
        with self._lock:
            self._last_used[parsed.key_id] = time.time()
        return entry.tenant

    def drain_usage(self) -> dict[str, float]:
        """Return and forget `{key_id: unix time of last use}` since the previous call."""
        with self._lock:
            used, self._last_used = self._last_used, {}
        return used

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


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing credentials: send metadata 'authorization: Bearer <api key>'",
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "malformed authorization metadata: expected 'Bearer <api key>'",
        )
    return token.strip()


def _refused(key_id: str) -> AuthError:
    return AuthError(
        grpc.StatusCode.UNAUTHENTICATED,
        f"API key {key_id} is not accepted: it is unknown, revoked, or its tenant is disabled",
    )
