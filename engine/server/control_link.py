"""The engine's side of the control plane: register, then heartbeat for ever.

Registration is retried with capped exponential backoff while the control plane is
down; a heartbeat answered NOT_FOUND or FAILED_PRECONDITION (the control plane forgot
this engine, or knows it under another boot id) registers again. Never raises but
for cancellation: the engine keeps serving whatever the control plane's state.
Each answered registration or heartbeat tells the key table that the control plane is
still there (`ApiKeyTable.touch`): a table not heard of for its TTL stops accepting keys.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from engine.server.auth import ApiKeyTable
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import control_plane_pb2_grpc as pb_grpc
from loraplex.v1.engine_admin_pb2 import EngineInfo

log = logging.getLogger(__name__)
_REREGISTER = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass(frozen=True)
class ControlLinkConfig:
    control_plane: str  # host:port of the control plane
    advertise: str  # host:port the control plane dials back to reach this engine
    admin_token: str
    heartbeat_interval_s: float = 2.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 10.0
    rpc_timeout_s: float = 5.0


async def run_control_link(
    config: ControlLinkConfig,
    engine_info: Callable[[], EngineInfo],
    key_table: ApiKeyTable | None = None,
) -> None:
    """Keep this engine registered and heartbeating until cancelled.

    `key_table`, when given, reports which keys were used (ApiKey.last_used_at) and
    is touched on every answer.
    """
    metadata = (("authorization", f"Bearer {config.admin_token}"),)
    # Key usage not yet acknowledged by a heartbeat: `{key_id: unix time of last use}`.
    # It outlives a registration, so usage drained just before the control plane asked
    # for a new one is still reported after it.
    pending: dict[str, float] = {}
    async with grpc.aio.insecure_channel(config.control_plane) as channel:
        stub = pb_grpc.ControlPlaneStub(channel)
        while True:
            engine_id = await _register(stub, config, engine_info, metadata)
            if key_table is not None:
                key_table.touch()
            await _heartbeat_until_forgotten(
                stub, config, engine_info, key_table, metadata, engine_id, pending
            )


async def _register(
    stub: pb_grpc.ControlPlaneStub,
    config: ControlLinkConfig,
    engine_info: Callable[[], EngineInfo],
    metadata: tuple[tuple[str, str], ...],
) -> int:
    delay = config.retry_initial_s
    while True:
        info = engine_info()
        try:
            reply = await stub.RegisterEngine(
                pb.RegisterEngineRequest(address=config.advertise, info=info),
                timeout=config.rpc_timeout_s,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "cannot register with the control plane at %s (%s: %s); retrying in %.1fs",
                config.control_plane,
                exc.code().name,
                exc.details(),
                delay,
            )
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, config.retry_max_s)
            continue
        if reply.base_model:
            log.info(
                "registered with the control plane as engine %d (base model %s)",
                reply.engine_id,
                reply.base_model,
            )
        else:
            log.warning(
                "registered as engine %d, but no base model registered at the control "
                "plane has this model's fingerprint %s; nothing will be placed here",
                reply.engine_id,
                info.model_fingerprint,
            )
        return int(reply.engine_id)


async def _heartbeat_until_forgotten(
    stub: pb_grpc.ControlPlaneStub,
    config: ControlLinkConfig,
    engine_info: Callable[[], EngineInfo],
    key_table: ApiKeyTable | None,
    metadata: tuple[tuple[str, str], ...],
    engine_id: int,
    pending: dict[str, float],
) -> None:
    """Heartbeat every interval; return when the control plane wants a new registration.

    `pending` (key usage to report) is updated in place and cleared once acknowledged.
    """
    while True:
        await asyncio.sleep(config.heartbeat_interval_s)
        if key_table is not None:
            for key_id, at in key_table.drain_usage().items():
                pending[key_id] = max(at, pending.get(key_id, 0.0))
        info = engine_info()
        # The engine's current boot id: if it differs from the registered one, the
        # control plane answers FAILED_PRECONDITION and this engine registers again.
        request = pb.HeartbeatRequest(
            engine_id=engine_id,
            boot_id=info.boot_id,
            info=info,
            key_usage=[_usage(k, t) for k, t in sorted(pending.items())],
        )
        try:
            await stub.Heartbeat(request, timeout=config.rpc_timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REREGISTER:
                log.warning("control plane asks this engine to register again: %s", exc.details())
                return  # key usage stays pending for the first heartbeat after it
            log.warning(
                "heartbeat to %s failed (%s: %s)",
                config.control_plane,
                exc.code().name,
                exc.details(),
            )
            continue  # key usage stays pending for the next heartbeat
        pending.clear()
        if key_table is not None:
            key_table.touch()


def _usage(key_id: str, at: float) -> pb.KeyUsage:
    usage = pb.KeyUsage(key_id=key_id)
    usage.last_used_at.FromDatetime(datetime.fromtimestamp(at, UTC))
    return usage
