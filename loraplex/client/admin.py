"""`AdminClient`: the control plane's admin API (tenants, API keys, base models,
adapter versions, engines) as blocking calls returning dataclasses.

    admin = AdminClient("127.0.0.1:50050", admin_token=os.environ["LORAPLEX_ADMIN_TOKEN"])
    admin.create_tenant("acme")
    key = admin.create_api_key("acme")          # key.api_key is shown only now
    admin.register_adapter("acme", "support", "/adapters/support", base_model="base")

Each call has a deadline (`timeout`, default 30 s) and raises the `LoraplexError`
subclass of a refusal with the server's sentence. UNAVAILABLE is retried with backoff
for reads and for writes that are safe to repeat (disable, revoke, register adapter,
retire); creating a tenant, key or base model is never retried, since a lost answer
does not mean the server did nothing. The engine-side RPCs (RegisterEngine,
Heartbeat) are not here: engines call them themselves.
"""

from __future__ import annotations

import time
from os import PathLike
from types import TracebackType
from typing import Any

import grpc

from loraplex.client import admin_types
from loraplex.client.channel import ChannelOptions, open_channel
from loraplex.client.errors import from_rpc_error
from loraplex.client.retry import NO_RETRY, Deadline, RetryPolicy, retry_wait_s
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import control_plane_pb2_grpc as pb_grpc


class AdminClient:
    """A blocking client of the `ControlPlane` service. Thread-safe; close it (or use
    it as a context manager) to release the channel."""

    def __init__(
        self,
        target: str,
        *,
        admin_token: str = "",
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: ChannelOptions = (),
    ) -> None:
        """`admin_token` is sent as "authorization: Bearer <token>" (a tenant's API key
        is accepted instead by `resolve_adapter`, for that tenant's adapters)."""
        self._retry = retry or RetryPolicy()
        self._timeout = timeout
        # Sent even when empty: the control plane then says which setting is missing.
        self._metadata = (("authorization", f"Bearer {admin_token}"),)
        self._channel = open_channel(target, self._retry, credentials, channel_options)
        self._stub = pb_grpc.ControlPlaneStub(self._channel)

    # Tenants
    def create_tenant(self, name: str, *, max_adapters: int = 0) -> admin_types.Tenant:
        """`max_adapters` 0 = the control plane's default."""
        request = pb.CreateTenantRequest(name=name, max_adapters=max_adapters)
        return admin_types.tenant(self._call("CreateTenant", request, retry=False))

    def list_tenants(self) -> list[admin_types.Tenant]:
        reply = self._call("ListTenants", pb.ListTenantsRequest())
        return [admin_types.tenant(t) for t in reply.tenants]

    def disable_tenant(self, name: str) -> admin_types.Tenant:
        """Its keys are refused on every engine within seconds; adapters stay registered."""
        return admin_types.tenant(self._call("DisableTenant", pb.DisableTenantRequest(name=name)))

    # API keys
    def create_api_key(self, tenant: str) -> admin_types.NewApiKey:
        """The answer is the only time the key is shown: store `api_key` now."""
        request = pb.CreateApiKeyRequest(tenant=tenant)
        return admin_types.new_api_key(self._call("CreateApiKey", request, retry=False))

    def revoke_api_key(self, key_id: str) -> admin_types.ApiKey:
        return admin_types.api_key(
            self._call("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=key_id))
        )

    def list_api_keys(self, tenant: str = "") -> list[admin_types.ApiKey]:
        """The keys of `tenant` ("" = every tenant), without their secrets."""
        reply = self._call("ListApiKeys", pb.ListApiKeysRequest(tenant=tenant))
        return [admin_types.api_key(k) for k in reply.keys]

    # Base models
    def register_base_model(
        self, name: str, path: str | PathLike[str], *, max_lora_rank: int = 0
    ) -> admin_types.BaseModel:
        """`path`: an absolute Hugging Face model folder as the control plane sees it."""
        request = pb.RegisterBaseModelRequest(
            name=name, path=str(path), max_lora_rank=max_lora_rank
        )
        return admin_types.base_model(self._call("RegisterBaseModel", request, retry=False))

    def list_base_models(self) -> list[admin_types.BaseModel]:
        reply = self._call("ListBaseModels", pb.ListBaseModelsRequest())
        return [admin_types.base_model(m) for m in reply.base_models]

    # Adapters
    def register_adapter(
        self,
        tenant: str,
        name: str,
        uri: str | PathLike[str],
        *,
        base_model: str,
        sha256: str = "",
        replicas: int = 0,
    ) -> admin_types.AdapterVersion:
        """Validates the adapter folder (`uri`: a path or file:// URI under the control
        plane's adapter roots) against `base_model` and creates its next version; the
        same content as the current version returns that version. An incompatible
        adapter raises FailedPreconditionError naming the first mismatch. `replicas` 0
        = every engine of the base model."""
        request = pb.RegisterAdapterRequest(
            tenant=tenant,
            name=name,
            uri=str(uri),
            base_model=base_model,
            sha256=sha256,
            replicas=replicas,
        )
        return admin_types.adapter_version(self._call("RegisterAdapter", request))

    def get_adapter(self, tenant: str, name: str) -> admin_types.Adapter:
        request = pb.GetAdapterRequest(tenant=tenant, name=name)
        return admin_types.adapter(self._call("GetAdapter", request))

    def list_adapters(self, tenant: str = "", *, page_size: int = 0) -> list[admin_types.Adapter]:
        """Every adapter of `tenant` ("" = every tenant), fetched `page_size` per call
        (0 = the server's default, 100) until the last page."""
        found: list[admin_types.Adapter] = []
        token = ""
        while True:
            request = pb.ListTenantAdaptersRequest(
                tenant=tenant, page_size=page_size, page_token=token
            )
            page = self._call("ListAdapters", request)
            found.extend(admin_types.adapter(a) for a in page.adapters)
            token = page.next_page_token
            if not token:
                return found

    def retire_adapter(
        self, tenant: str, name: str, *, version: int = 0
    ) -> admin_types.RetireResult:
        """Retires `version` (0 = every version) and evicts it from every engine;
        retiring the current version moves "tenant/name" to the newest active one."""
        request = pb.RetireAdapterRequest(tenant=tenant, name=name, version=version)
        return admin_types.retire_result(self._call("RetireAdapter", request))

    def resolve_adapter(self, adapter: str) -> admin_types.Resolution:
        """Which version "tenant/name" or "tenant/name@version" means now, and the
        engines serving it."""
        request = pb.ResolveAdapterRequest(adapter=adapter)
        return admin_types.resolution(self._call("ResolveAdapter", request))

    # Engines
    def list_engines(self) -> list[admin_types.Engine]:
        reply = self._call("ListEngines", pb.ListEnginesRequest())
        return [admin_types.engine(e) for e in reply.engines]

    def _call(self, method: str, request: Any, *, retry: bool = True) -> Any:
        policy = self._retry if retry else NO_RETRY
        deadline = Deadline(self._timeout)
        rpc = getattr(self._stub, method)
        attempt = 0
        while True:
            attempt += 1
            try:
                return rpc(request, metadata=self._metadata, timeout=deadline.remaining_s())
            except grpc.RpcError as exc:
                wait_s = retry_wait_s(policy, attempt, exc.code(), False, deadline)
                if wait_s is None:
                    raise from_rpc_error(exc) from exc
            time.sleep(wait_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
