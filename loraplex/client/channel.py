"""Opening gRPC channels (sync and aio) and the credentials metadata every call sends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from loraplex.client.retry import RetryPolicy

ChannelOptions = Sequence[tuple[str, Any]]


def _options(policy: RetryPolicy, extra: ChannelOptions) -> list[tuple[str, Any]]:
    # A broken connection must be re-dialled at least as often as the policy retries:
    # with gRPC's default (1 s, growing to 120 s) a retry fails at once against a
    # channel that is still waiting to reconnect. Options the caller gives win.
    defaults = {
        "grpc.initial_reconnect_backoff_ms": max(1, int(policy.initial_backoff_s * 1000)),
        "grpc.max_reconnect_backoff_ms": max(1, int(policy.max_backoff_s * 1000)),
    }
    defaults.update(dict(extra))
    return list(defaults.items())


def open_channel(
    target: str,
    policy: RetryPolicy,
    credentials: grpc.ChannelCredentials | None,
    options: ChannelOptions,
) -> grpc.Channel:
    opts = _options(policy, options)
    if credentials is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, credentials, options=opts)


def open_aio_channel(
    target: str,
    policy: RetryPolicy,
    credentials: grpc.ChannelCredentials | None,
    options: ChannelOptions,
) -> grpc.aio.Channel:
    opts = _options(policy, options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata for a bearer credential; none for an empty token."""
    return (("authorization", f"Bearer {token}"),) if token else ()
