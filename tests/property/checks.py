"""What "a clean answer" means for every property test: a refusal is a status the caller
can act on, with a sentence; never INTERNAL or UNKNOWN (the server failed on what it
was sent), never DEADLINE_EXCEEDED (the call hung)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from hypothesis import HealthCheck, settings

# Statuses a server may answer to input it refuses. UNAVAILABLE is not among them: a
# healthy server on loopback has no reason to say "retry later" to a bad request.
CLEAN_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# A flood of wrong API keys may be refused before verification (loraplex.key_guard):
# too many failures from one address, or every verifier thread busy.
RATE_LIMITED = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
CALL_TIMEOUT_S = 30.0  # far beyond any answer these servers give to small requests


def check_refusal(
    error: grpc.RpcError, what: str, also_ok: tuple[grpc.StatusCode, ...] = ()
) -> grpc.StatusCode:
    """Asserts `error` is a clean refusal (or one of `also_ok`) with a sentence; returns
    its code."""
    code = error.code()
    assert code in CLEAN_REFUSALS or code in also_ok, (
        f"{what}: answered {code.name}: {error.details()!r}"
    )
    assert (error.details() or "").strip(), f"{what}: {code.name} without a sentence"
    return code


def call_cleanly(call: Callable[..., Any], request: Any, what: str, **kw: Any) -> Any:
    """`call(request)` with a deadline; the response, or None after a clean refusal."""
    try:
        return call(request, timeout=CALL_TIMEOUT_S, **kw)
    except grpc.RpcError as error:
        check_refusal(error, what)
        return None


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Polls `condition` until it holds or `timeout_s` passes; its last verdict."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def property_settings(max_examples: int) -> settings:
    """Hypothesis settings of these tests: the servers are module fixtures, examples run
    real RPCs (no per-example deadline), and some examples are huge on purpose."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large),
    )
