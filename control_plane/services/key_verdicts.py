"""Remembered scrypt verdicts for API keys presented to the control plane.

Verifying a key runs scrypt (tens of milliseconds, on purpose), and ResolveAdapter may
be called with a tenant's key on every request. A verdict is remembered under the
sha256 of the presented key, together with the key id and stored hash it was checked
against; it answers only while the key's row still holds that same hash. Revocation
and a disabled tenant are read from the database on every call, so they need no
invalidation here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

# Enough for every live key of a large fleet plus a flood of wrong ones, without
# growing without limit (least recently used verdicts are dropped first).
MAX_VERDICTS = 10_000


class KeyVerdicts:
    """Thread-safe LRU of `sha256(presented key) -> (key_id, stored hash, verdict)`."""

    def __init__(self, max_entries: int = MAX_VERDICTS) -> None:
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._verdicts: OrderedDict[bytes, tuple[str, str, bool]] = OrderedDict()

    def get(self, digest: bytes, key_id: str, secret_hash: str) -> bool | None:
        """The remembered verdict, or None when there is none for this key id and hash."""
        with self._lock:
            cached = self._verdicts.get(digest)
            if cached is None or cached[:2] != (key_id, secret_hash):
                return None
            self._verdicts.move_to_end(digest)
            return cached[2]

    def accepted(self, digest: bytes) -> bool:
        """Whether this presented key was accepted before (against whichever hash): such
        a key passes the failure limits, and `get` still checks it against the stored
        hash once the row is read."""
        with self._lock:
            cached = self._verdicts.get(digest)
            return cached is not None and cached[2]

    def put(self, digest: bytes, key_id: str, secret_hash: str, verdict: bool) -> None:
        with self._lock:
            self._verdicts[digest] = (key_id, secret_hash, verdict)
            self._verdicts.move_to_end(digest)
            while len(self._verdicts) > self._max_entries:
                self._verdicts.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._verdicts)
