"""When to try a call again, and how long to wait first.

Only UNAVAILABLE is retried (the server could not be reached, was starting or
draining): every other status is an answer that a second try would repeat. A
generation is retried only while nothing of it has arrived: once a token was streamed,
a new attempt would show the caller text twice, so the error is raised instead.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: the n-th retry waits initial_backoff_s * multiplier**(n-1),
    at most max_backoff_s, each wait scaled by a random factor in [1 - jitter, 1 + jitter]
    so that many clients do not come back in step. `max_attempts` counts the first try;
    1 turns retries off."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts counts the first try and must be at least 1")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("backoffs must be positive, max_backoff_s >= initial_backoff_s")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("multiplier must be >= 1 and jitter in [0, 1)")

    def backoff_s(self, retry: int) -> float:
        """The wait before retry number `retry` (1 = the second attempt)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


NO_RETRY = RetryPolicy(max_attempts=1)


class Deadline:
    """A call's time budget across all of its attempts; None = no limit."""

    def __init__(self, timeout_s: float | None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout must be positive seconds or None, not {timeout_s}")
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining_s(self) -> float | None:
        """Seconds left (at least a millisecond, so a call made now fails by itself
        with DEADLINE_EXCEEDED), or None without a limit."""
        return None if self._end is None else max(0.001, self._end - time.monotonic())

    def allows(self, wait_s: float) -> bool:
        return self._end is None or time.monotonic() + wait_s < self._end


def retry_wait_s(
    policy: RetryPolicy,
    attempt: int,
    code: grpc.StatusCode,
    received: bool,
    deadline: Deadline,
) -> float | None:
    """Seconds to wait before trying again after attempt number `attempt` (1-based)
    failed with `code`; None = give up and raise. `received`: whether any response of
    that attempt reached the caller."""
    if code != grpc.StatusCode.UNAVAILABLE or received or attempt >= policy.max_attempts:
        return None
    wait_s = policy.backoff_s(attempt)
    return wait_s if deadline.allows(wait_s) else None
