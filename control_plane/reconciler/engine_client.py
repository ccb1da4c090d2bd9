"""The reconciler's calls to engines' EngineAdmin service, one cached channel per engine."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from control_plane.metrics import ControlPlaneMetrics
from control_plane.reconciler.plan import Load, ObservedAdapter
from loraplex.v1 import engine_admin_pb2 as pb
from loraplex.v1 import engine_admin_pb2_grpc as pb_grpc


class EngineClient:
    """Counts every load, eviction and key sync by outcome in `metrics`."""

    def __init__(
        self,
        admin_token: str,
        rpc_timeout_s: float,
        load_timeout_s: float,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else ControlPlaneMetrics()
        self._metadata = (("authorization", f"Bearer {admin_token}"),)
        self._timeout = rpc_timeout_s
        self._load_timeout = load_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> pb_grpc.EngineAdminStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        return pb_grpc.EngineAdminStub(channel)

    async def list_adapters(self, address: str) -> dict[str, ObservedAdapter]:
        """What the engine holds, by adapter id. Raises grpc.aio.AioRpcError."""
        reply = await self._stub(address).ListAdapters(
            pb.ListAdaptersRequest(), timeout=self._timeout, metadata=self._metadata
        )
        return {
            a.adapter_id: ObservedAdapter(
                adapter_id=a.adapter_id,
                aliases=frozenset(a.aliases),
                sha256=a.sha256,
                evicting=a.evicting,
            )
            for a in reply.adapters
        }

    async def load(self, address: str, action: Load) -> tuple[str, str]:
        """`("", "")` on success, else `(status name, engine's message)`."""
        request = pb.LoadAdapterRequest(
            adapter_id=action.adapter_id,
            path=action.path,
            sha256=action.sha256,
            tenant=action.tenant,
            aliases=list(action.aliases),
            config_sha256=action.config_sha256,
            chunked_sha256=action.chunked_sha256,
        )
        try:
            await self._stub(address).LoadAdapter(
                request, timeout=self._load_timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            self._metrics.adapter_loaded(exc.code().name)
            return exc.code().name, exc.details() or ""
        self._metrics.adapter_loaded("")
        return "", ""

    async def evict(self, address: str, adapter_id: str) -> tuple[str, str]:
        try:
            await self._stub(address).EvictAdapter(
                pb.EvictAdapterRequest(adapter_id=adapter_id),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            self._metrics.adapter_evicted(exc.code().name)
            return exc.code().name, exc.details() or ""
        self._metrics.adapter_evicted("")
        return "", ""

    async def sync_keys(
        self, address: str, generation: int, keys: Sequence[tuple[str, str, str]]
    ) -> int:
        """Push the whole key table; the generation the engine holds afterwards."""
        request = pb.SyncApiKeysRequest(
            generation=generation,
            keys=[pb.ApiKeyEntry(key_id=k, secret_hash=h, tenant=t) for k, h, t in keys],
        )
        try:
            reply = await self._stub(address).SyncApiKeys(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            self._metrics.keys_synced(exc.code().name)
            raise
        self._metrics.keys_synced("")
        return int(reply.generation)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
