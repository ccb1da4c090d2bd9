"""`EngineAdmin`: load, evict and list adapters; engine facts; the API key table.

Load and evict are idempotent and say what happened, so the control plane's
reconciler can push them blindly. Every call passes the admin token check both servers
share (`loraplex.admin_token.engine_admin_check`, on the gRPC server and on the front
end's where there is one): with an admin token each call must carry
`authorization: Bearer <admin token>`; without one, EngineAdmin is served to loopback
callers only. LoadAdapter reads only under the engine's adapter roots, and refuses to
read anything when none are configured; what the registry refuses leaves with its
status from `engine.server.statuses`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from datetime import datetime

import grpc

from engine.engine import EngineLoop
from engine.formats.adapter_folder import require_roots
from engine.lora.registry import AdapterRegistry, LoadedAdapter
from engine.server.auth import ApiKeyTable
from engine.server.statuses import Refused, translated
from loraplex.v1 import engine_admin_pb2 as pb
from loraplex.v1 import engine_admin_pb2_grpc

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _check_chunked_sha256(request: pb.LoadAdapterRequest) -> None:
    """INVALID_ARGUMENT for a chunked_sha256 that could not be what was registered."""
    chunked = request.chunked_sha256
    if chunked and not request.sha256:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            "chunked_sha256 stands for the sha256 it was registered beside: give both, or neither",
        )
    if chunked and not _HEX64.fullmatch(chunked):
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"chunked_sha256 {chunked[:80]!r} is not 64 hex digits; send the digest the "
            "control plane registered, or leave it empty",
        )


class EngineAdminServicer(engine_admin_pb2_grpc.EngineAdminServicer):
    def __init__(
        self,
        engine: EngineLoop,  # read only, through its snapshot: which adapters sit in slots
        adapters: AdapterRegistry,
        keys: ApiKeyTable,
        engine_info: Callable[[], pb.EngineInfo],
        require_tenant: bool = False,  # under a control plane: no adapter is nobody's
    ) -> None:
        self._engine = engine
        self._adapters = adapters
        self._keys = keys
        self._engine_info = engine_info
        self._require_tenant = require_tenant

    @translated
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context):  # noqa: N802
        if not request.adapter_id or not request.path:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "LoadAdapter needs adapter_id and path")
        if self._require_tenant and not request.tenant:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "this engine serves a control plane, where every adapter belongs to a "
                "tenant: LoadAdapter needs tenant",
            )
        _check_chunked_sha256(request)
        require_roots(self._adapters.adapter_roots)  # FAILED_PRECONDITION when none
        # The registry's refusals (format, path, conflict, evicting) leave by `translated`.
        outcome, record = await asyncio.to_thread(
            self._adapters.load,
            request.adapter_id,
            request.path,
            sha256=request.sha256,
            tenant=request.tenant,
            aliases=tuple(request.aliases),
            config_sha256=request.config_sha256,
            chunked_sha256=request.chunked_sha256,
        )
        return pb.LoadAdapterResponse(
            outcome=pb.LOAD_OUTCOME_LOADED
            if outcome == "loaded"
            else pb.LOAD_OUTCOME_ALREADY_LOADED,
            adapter=self._info(record, self._engine.snapshot().slot_of),
        )

    async def EvictAdapter(self, request: pb.EvictAdapterRequest, context):  # noqa: N802
        # The registry refuses new requests at once; its on_drop (EngineLoop.forget_adapter)
        # has the engine loop free the slot once the adapter's last request ends.
        if self._adapters.evict(request.adapter_id) == "not_present":
            return pb.EvictAdapterResponse(outcome=pb.EVICT_OUTCOME_NOT_PRESENT)
        return pb.EvictAdapterResponse(outcome=pb.EVICT_OUTCOME_EVICTED)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context):  # noqa: N802
        slot_of = self._engine.snapshot().slot_of
        return pb.ListAdaptersResponse(
            adapters=[self._info(r, slot_of) for r in self._adapters.list()]
        )

    async def GetEngineInfo(self, request: pb.GetEngineInfoRequest, context):  # noqa: N802
        return self._engine_info()

    async def SyncApiKeys(self, request: pb.SyncApiKeysRequest, context):  # noqa: N802
        return pb.SyncApiKeysResponse(generation=self._keys.sync(request.keys, request.generation))

    def _info(self, record: LoadedAdapter, slot_of: Mapping[str, int]) -> pb.AdapterInfo:
        """`slot_of`: the resident adapters of one engine snapshot."""
        if record.adapter_id in slot_of:
            residency = pb.RESIDENCY_GPU
        elif record.in_cpu_cache:
            residency = pb.RESIDENCY_CPU
        else:
            residency = pb.RESIDENCY_DISK
        info = pb.AdapterInfo(
            adapter_id=record.adapter_id,
            tenant=record.tenant,
            aliases=list(record.aliases),
            rank=record.rank,
            size_bytes=record.size_bytes,
            residency=residency,
            requests_in_flight=record.requests_in_flight,
            sha256=record.sha256,
            target_modules=list(record.target_modules),
            alpha=record.alpha,
            evicting=record.evicting,
            path=str(record.path),
        )
        if isinstance(record.last_used, datetime):
            info.last_used.FromDatetime(record.last_used)
        return info
