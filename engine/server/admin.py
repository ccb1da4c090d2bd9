"""`EngineAdmin`: load, evict and list adapters; engine facts; the API key table.

Load and evict are idempotent and say what happened, so the control plane's
reconciler can push them blindly. When the engine runs with an admin token, every
call must carry `authorization: Bearer <admin token>`; without one, EngineAdmin is
served to loopback callers only, so a standalone engine bound to a public address is
not open to whoever reaches its port. LoadAdapter reads only under the engine's
adapter roots, and refuses to read anything when none are configured.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Callable
from datetime import datetime

import grpc

from engine.engine import Engine
from engine.lora.errors import (
    AdapterConflictError,
    AdapterEvictingError,
    AdapterFormatError,
    AdapterPathError,
)
from engine.lora.registry import AdapterRecord, AdapterRegistry
from engine.server.auth import ApiKeyTable
from loraplex.key_guard import peer_host
from loraplex.v1 import engine_admin_pb2 as pb
from loraplex.v1 import engine_admin_pb2_grpc

# Adapters that are well formed but cannot run on this base model or engine; every
# other format error is a malformed folder (INVALID_ARGUMENT).
_INCOMPATIBLE = frozenset(
    {
        "shape_mismatch",
        "layer_out_of_range",
        "rank_too_large",
        "sha256_mismatch",
        "config_sha256_mismatch",
        "dora",
        "modules_to_save",
        "unsupported_option",
    }
)


class EngineAdminServicer(engine_admin_pb2_grpc.EngineAdminServicer):
    def __init__(
        self,
        engine: Engine,  # read only: which adapters sit in device slots
        adapters: AdapterRegistry,
        keys: ApiKeyTable,
        engine_info: Callable[[], pb.EngineInfo],
        admin_token: str,
        require_tenant: bool = False,  # under a control plane: no adapter is nobody's
    ) -> None:
        self._engine = engine
        self._adapters = adapters
        self._keys = keys
        self._engine_info = engine_info
        self._admin_token = admin_token
        self._require_tenant = require_tenant

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context):  # noqa: N802
        await self._check_admin(context)
        if not request.adapter_id or not request.path:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "LoadAdapter needs adapter_id and path"
            )
        if self._require_tenant and not request.tenant:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "this engine serves a control plane, where every adapter belongs to a "
                "tenant: LoadAdapter needs tenant",
            )
        if not self._adapters.adapter_roots:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this engine has no adapter roots, so LoadAdapter may read no path: start "
                "it with --adapter-root DIR (or LORAPLEX_ADAPTER_ROOTS=DIR[:DIR...]) naming "
                "the folders adapters are loaded from",
            )
        try:
            outcome, record = await asyncio.to_thread(
                self._adapters.load,
                request.adapter_id,
                request.path,
                sha256=request.sha256,
                tenant=request.tenant,
                aliases=tuple(request.aliases),
                config_sha256=request.config_sha256,
            )
        except AdapterPathError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except AdapterFormatError as exc:
            code = (
                grpc.StatusCode.FAILED_PRECONDITION
                if exc.reason in _INCOMPATIBLE
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            await context.abort(code, str(exc))
        except AdapterConflictError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except AdapterEvictingError as exc:  # other content under an id still draining
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.LoadAdapterResponse(
            outcome=pb.LOAD_OUTCOME_LOADED
            if outcome == "loaded"
            else pb.LOAD_OUTCOME_ALREADY_LOADED,
            adapter=self._info(record),
        )

    async def EvictAdapter(self, request: pb.EvictAdapterRequest, context):  # noqa: N802
        await self._check_admin(context)
        # The registry refuses new requests at once; its on_drop frees the slot later.
        if self._adapters.evict(request.adapter_id) == "not_present":
            return pb.EvictAdapterResponse(outcome=pb.EVICT_OUTCOME_NOT_PRESENT)
        return pb.EvictAdapterResponse(outcome=pb.EVICT_OUTCOME_EVICTED)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context):  # noqa: N802
        await self._check_admin(context)
        return pb.ListAdaptersResponse(adapters=[self._info(r) for r in self._adapters.list()])

    async def GetEngineInfo(self, request: pb.GetEngineInfoRequest, context):  # noqa: N802
        await self._check_admin(context)
        return self._engine_info()

    async def SyncApiKeys(self, request: pb.SyncApiKeysRequest, context):  # noqa: N802
        await self._check_admin(context)
        return pb.SyncApiKeysResponse(generation=self._keys.sync(request.keys, request.generation))

    async def _check_admin(self, context) -> None:
        if not self._admin_token:
            if not _is_loopback(context.peer()):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "this engine runs without an admin token, so EngineAdmin answers only "
                    "callers on this machine (loopback); start the engine with --admin-token "
                    "(or LORAPLEX_ADMIN_TOKEN) to manage it from elsewhere",
                )
            return
        header = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {self._admin_token}".encode()):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "EngineAdmin needs metadata 'authorization: Bearer <admin token>'",
            )

    def _info(self, record: AdapterRecord) -> pb.AdapterInfo:
        in_slot = self._engine.scheduler.slots.slot_of(record.adapter_id) is not None
        if in_slot:
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


def _is_loopback(peer: str) -> bool:
    """True for a gRPC peer on this machine: 127.0.0.0/8, ::1 (also IPv4-mapped), or a
    unix socket."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    try:
        address = ipaddress.ip_address(peer_host(peer))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
