"""The ControlPlane gRPC servicer: translate requests to service calls and back.

Services are synchronous (SQLAlchemy sessions) and run in worker threads. A ServiceError
becomes its status code with its sentence; a database that is down or too slow
answers UNAVAILABLE (retry later); anything else is logged and answered INTERNAL
without details.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from control_plane import convert
from control_plane.db import database_unreachable
from control_plane.errors import ErrorCode, ServiceError
from control_plane.services.adapters import AdapterService
from control_plane.services.base_models import BaseModelService
from control_plane.services.engines import EngineService
from control_plane.services.tenants import TenantService
from loraplex.bearer import bearer_token, metadata_authorization, tokens_match
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import control_plane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


@dataclass(frozen=True)
class Services:
    tenants: TenantService
    base_models: BaseModelService
    adapters: AdapterService
    engines: EngineService


def _translated(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await context.abort(grpc.StatusCode[exc.code.value], exc.message)
            raise  # unreachable: abort raises
        except Exception as exc:
            if database_unreachable(exc):
                log.warning("%s: the database is unreachable: %s", method.__name__, exc)
                await context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_UNAVAILABLE)
            log.exception("%s failed", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, "internal error in the control plane; see its log"
            )
            raise

    return wrapper


DATABASE_UNAVAILABLE = (
    "the control plane cannot reach its database right now (down, restarting or too "
    "slow); retry in a few seconds"
)


def _actor(context: grpc.aio.ServicerContext) -> str:
    return f"admin@{context.peer()}"


class ControlPlaneServicer(pb_grpc.ControlPlaneServicer):
    def __init__(self, services: Services, admin_token: str) -> None:
        self._s = services
        self._admin_token = admin_token

    @_translated
    async def CreateTenant(self, request: pb.CreateTenantRequest, context: Any) -> pb.Tenant:
        record = await asyncio.to_thread(
            self._s.tenants.create_tenant, request.name, request.max_adapters, _actor(context)
        )
        return convert.tenant(record)

    @_translated
    async def ListTenants(self, request: Any, context: Any) -> pb.ListTenantsResponse:
        records = await asyncio.to_thread(self._s.tenants.list_tenants)
        return pb.ListTenantsResponse(tenants=[convert.tenant(r) for r in records])

    @_translated
    async def DisableTenant(self, request: pb.DisableTenantRequest, context: Any) -> pb.Tenant:
        record = await asyncio.to_thread(
            self._s.tenants.disable_tenant, request.name, _actor(context)
        )
        return convert.tenant(record)

    @_translated
    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Any
    ) -> pb.CreateApiKeyResponse:
        key = await asyncio.to_thread(
            self._s.tenants.create_api_key, request.tenant, _actor(context)
        )
        return pb.CreateApiKeyResponse(
            key_id=key.key_id, secret=key.secret, api_key=key.api_key, tenant=key.tenant
        )

    @_translated
    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Any) -> pb.ApiKey:
        record = await asyncio.to_thread(
            self._s.tenants.revoke_api_key, request.key_id, _actor(context)
        )
        return convert.api_key(record)

    @_translated
    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Any
    ) -> pb.ListApiKeysResponse:
        records = await asyncio.to_thread(self._s.tenants.list_api_keys, request.tenant)
        return pb.ListApiKeysResponse(keys=[convert.api_key(r) for r in records])

    @_translated
    async def RegisterBaseModel(
        self, request: pb.RegisterBaseModelRequest, context: Any
    ) -> pb.BaseModel:
        record = await asyncio.to_thread(
            self._s.base_models.register_base_model,
            request.name,
            request.path,
            request.max_lora_rank,
            _actor(context),
        )
        return convert.base_model(record)

    @_translated
    async def ListBaseModels(self, request: Any, context: Any) -> pb.ListBaseModelsResponse:
        records = await asyncio.to_thread(self._s.base_models.list_base_models)
        return pb.ListBaseModelsResponse(base_models=[convert.base_model(r) for r in records])

    @_translated
    async def RegisterAdapter(
        self, request: pb.RegisterAdapterRequest, context: Any
    ) -> pb.AdapterVersion:
        record = await asyncio.to_thread(
            functools.partial(
                self._s.adapters.register_adapter,
                request.tenant,
                request.name,
                request.uri,
                request.base_model,
                sha256=request.sha256,
                replicas=request.replicas,
                actor=_actor(context),
            )
        )
        return convert.version(record)

    @_translated
    async def GetAdapter(self, request: pb.GetAdapterRequest, context: Any) -> pb.Adapter:
        record = await asyncio.to_thread(self._s.adapters.get_adapter, request.tenant, request.name)
        return convert.adapter(record)

    @_translated
    async def ListAdapters(
        self, request: pb.ListTenantAdaptersRequest, context: Any
    ) -> pb.ListTenantAdaptersResponse:
        page = await asyncio.to_thread(
            self._s.adapters.list_adapters, request.tenant, request.page_size, request.page_token
        )
        return pb.ListTenantAdaptersResponse(
            adapters=[convert.adapter(a) for a in page.adapters],
            next_page_token=page.next_page_token,
        )

    @_translated
    async def RetireAdapter(
        self, request: pb.RetireAdapterRequest, context: Any
    ) -> pb.RetireAdapterResponse:
        retired, adapter = await asyncio.to_thread(
            self._s.adapters.retire_adapter,
            request.tenant,
            request.name,
            request.version,
            _actor(context),
        )
        return pb.RetireAdapterResponse(
            retired=[convert.version(v) for v in retired], adapter=convert.adapter(adapter)
        )

    @_translated
    async def RegisterEngine(
        self, request: pb.RegisterEngineRequest, context: Any
    ) -> pb.RegisterEngineResponse:
        registration = await asyncio.to_thread(
            self._s.engines.register_engine,
            request.address,
            convert.engine_facts(request.info),
            f"engine@{request.address}",
        )
        return pb.RegisterEngineResponse(
            engine_id=registration.engine_id, base_model=registration.base_model
        )

    @_translated
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        usage = {
            u.key_id: convert.from_timestamp(u.last_used_at, "key_usage.last_used_at")
            for u in request.key_usage
        }
        await asyncio.to_thread(
            self._s.engines.heartbeat,
            request.engine_id,
            request.boot_id,
            convert.engine_facts(request.info),
            usage,
        )
        return pb.HeartbeatResponse()

    @_translated
    async def ListEngines(self, request: Any, context: Any) -> pb.ListEnginesResponse:
        records = await asyncio.to_thread(self._s.engines.list_engines)
        return pb.ListEnginesResponse(engines=[convert.engine(r) for r in records])

    @_translated
    async def ResolveAdapter(
        self, request: pb.ResolveAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveAdapterResponse:
        authorization = metadata_authorization(context.invocation_metadata())  # type: ignore[arg-type]
        token = bearer_token(authorization)
        if not token:
            raise ServiceError(
                ErrorCode.UNAUTHENTICATED,
                "missing credentials: send 'authorization: Bearer <api key>' (or the admin token)",
            )
        caller: str | None = None
        if not tokens_match(token, self._admin_token):
            caller = await self._s.tenants.authenticate_async(token, context.peer())
        resolution = await asyncio.to_thread(
            self._s.engines.resolve_adapter, request.adapter, caller
        )
        return pb.ResolveAdapterResponse(
            adapter_id=resolution.adapter_id,
            tenant=resolution.tenant,
            name=resolution.name,
            version=resolution.version,
            base_model=resolution.base_model,
            endpoints=list(resolution.endpoints),
        )
