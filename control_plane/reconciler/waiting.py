"""Waits and worker threads for the reconciler's loops that stop when told to.

Two traps stopped the control plane unreliably:
- `asyncio.wait_for` on Python 3.11 swallows a cancellation that arrives just as the
  awaited thing finishes (a nudge set the wake event): the loop went on for ever and
  `stop()` hung. `wait_event` uses `asyncio.timeout`, which does not.
- Cancelling `await asyncio.to_thread(...)` returns at once while the thread carries
  on with its transaction, so database work outlived `stop()` (and deadlocked with
  whatever ran next). `in_thread` waits for the thread before passing the
  cancellation on; the database's statement timeout bounds that wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from control_plane.db import database_unreachable

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `event`; whether it was set. A cancellation
    always propagates."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread. When cancelled, waits for the thread to finish
    (its result or error is dropped), then raises CancelledError."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])  # a second cancellation ends this wait
        if not work.cancelled():
            work.exception()  # retrieved: no "exception was never retrieved" warning
        raise


def log_failure(log: logging.Logger, what: str, exc: BaseException) -> None:
    """One line when the database is out of reach (it repeats every pass until it is
    back), the whole traceback for anything else."""
    if database_unreachable(exc):
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("%s: the database is unreachable: %s", what, reason)
    else:
        log.error(what, exc_info=exc)
