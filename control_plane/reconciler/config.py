"""The reconciler's settings, checked for consistency once when built."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

# Permanent-failure codes: the engine refused the adapter itself, not for want of time.
PERMANENT_CODES = frozenset(
    {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED"}
)
MAX_OWNER_LENGTH = 64  # engines.lease_owner


@dataclass(frozen=True)
class ReconcilerConfig:
    """Durations in seconds.

    Leases: a replica renews its engines' lease every `lease_s / 3` and starts a call to
    an engine only while the lease it last wrote outlasts that call's timeout, so no
    call of a replica is still running on an engine once another replica may take it
    over. Hence `lease_s >= 2 * load_timeout_s`: right before a renewal two thirds of the
    lease are left, and a slow renewal still leaves room for the longest call.

    Keys: the key table is pushed at once on every change made through this replica,
    and every `key_sync_interval_s` to engines behind the current generation (changes
    made through other replicas), independent of the Load/Evict passes.
    """

    interval_s: float = 2.0
    heartbeat_timeout_s: float = 10.0
    lease_s: float = 60.0
    retry_base_s: float = 1.0
    retry_cap_s: float = 60.0
    # A load refused with one of `permanent_codes` this many times in a row is final.
    fail_after_attempts: int = 3
    permanent_codes: frozenset[str] = PERMANENT_CODES
    rpc_timeout_s: float = 10.0
    load_timeout_s: float = 30.0
    key_sync_interval_s: float = 1.0
    # Engines silent this long are presumed gone: no more key pushes. Stale engines
    # (silent for `heartbeat_timeout_s`) still get them: they may still be serving.
    gone_after_s: float = 300.0
    # Who holds the engine leases this replica takes. Keep it stable across restarts
    # (the CLI uses cp-<hostname>-<port>): a replica killed mid-pass and started again takes its
    # engines back at once instead of waiting `lease_s` for its old leases to run out.
    owner: str = field(default_factory=lambda: f"cp-{uuid.uuid4().hex[:12]}")

    def __post_init__(self) -> None:
        durations = {
            "interval_s": self.interval_s,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "lease_s": self.lease_s,
            "retry_base_s": self.retry_base_s,
            "retry_cap_s": self.retry_cap_s,
            "rpc_timeout_s": self.rpc_timeout_s,
            "load_timeout_s": self.load_timeout_s,
            "key_sync_interval_s": self.key_sync_interval_s,
            "gone_after_s": self.gone_after_s,
        }
        for name, value in durations.items():
            if not value > 0:
                raise ValueError(f"reconciler {name} must be positive, not {value}")
        if self.fail_after_attempts < 1:
            raise ValueError("reconciler fail_after_attempts must be at least 1")
        if self.retry_cap_s < self.retry_base_s:
            raise ValueError("reconciler retry_cap_s must not be below retry_base_s")
        longest_call = max(self.load_timeout_s, self.rpc_timeout_s)
        if self.lease_s < 2 * longest_call:
            raise ValueError(
                f"reconciler lease_s ({self.lease_s:g}) must be at least twice the longest "
                f"engine call ({longest_call:g} s): a pass renews its lease every lease_s/3 "
                "and starts a call only if the lease outlasts it"
            )
        if self.gone_after_s < self.heartbeat_timeout_s:
            raise ValueError("reconciler gone_after_s must not be below heartbeat_timeout_s")
        if not 0 < len(self.owner) <= MAX_OWNER_LENGTH:
            raise ValueError(
                f"the replica id must be 1 to {MAX_OWNER_LENGTH} characters, not {self.owner!r}"
            )

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3
