"""Tenants and their API keys, and checking a key a tenant presents.

Checking a key runs scrypt the first time a presented key meets its stored hash; that
runs on a `KeyGuard`'s bounded pool behind limits on failures per key id and per peer
(`loraplex.key_guard`), so wrong secrets cannot hold the threads database work runs on.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import Future
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError

from control_plane.errors import ErrorCode, ServiceError, already_exists, not_found, precondition
from control_plane.models import ApiKey, Tenant, TenantState
from control_plane.records import ApiKeyRecord, NewApiKey, TenantRecord
from control_plane.repositories.audit import AuditRepository
from control_plane.repositories.tenants import (
    ApiKeyRepository,
    KeyTableGeneration,
    TenantRepository,
)
from control_plane.services.common import (
    ServiceContext,
    check_count,
    check_tenant_name,
    check_text,
)
from control_plane.services.key_verdicts import KeyVerdicts
from loraplex.key_guard import KeyGuard, TooManyFailures, VerifierBusy, peer_host
from loraplex.keys import KeyFormatError, hash_secret, new_key, parse_key

_REFUSED = "API key is unknown or revoked, or its tenant is disabled; ask the admin for a key"


@dataclass(frozen=True)
class _Pending:
    """A presented key of an active tenant whose secret scrypt must check."""

    key_id: str
    secret: str
    secret_hash: str
    digest: bytes
    tenant: str
    peer: str


class TenantService:
    def __init__(
        self, ctx: ServiceContext, default_max_adapters: int, guard: KeyGuard | None = None
    ) -> None:
        self._ctx = ctx
        self._default_max_adapters = default_max_adapters
        self._verdicts = KeyVerdicts()
        self.guard = guard or KeyGuard()

    def create_tenant(self, name: str, max_adapters: int, actor: str) -> TenantRecord:
        """`max_adapters` 0 means the control plane's default."""
        check_tenant_name(name)
        check_count("max_adapters", max_adapters)
        now = self._ctx.clock()
        try:
            with self._ctx.sessions.begin() as session:
                tenants = TenantRepository(session)
                if tenants.get(name) is not None:
                    raise already_exists(f"tenant {name!r} already exists")
                tenant = tenants.add(name, max_adapters or self._default_max_adapters, now)
                AuditRepository(session).record(actor, "tenant.create", name, now)
                return _tenant_record(tenant, 0, 0)
        except IntegrityError as exc:  # another replica created it between check and insert
            raise already_exists(f"tenant {name!r} already exists") from exc

    def list_tenants(self) -> list[TenantRecord]:
        with self._ctx.sessions.begin() as session:
            return [_tenant_record(t, a, k) for t, a, k in TenantRepository(session).list()]

    def disable_tenant(self, name: str, actor: str) -> TenantRecord:
        now = self._ctx.clock()
        with self._ctx.sessions.begin() as session:
            tenants = TenantRepository(session)
            tenant = _require_tenant(tenants, name, for_update=True)
            if tenant.state != TenantState.DISABLED:
                tenant.state = TenantState.DISABLED
                tenant.disabled_at = now
                KeyTableGeneration(session).bump()
                AuditRepository(session).record(actor, "tenant.disable", name, now)
            record = _tenant_record(
                tenant, tenants.count_adapters(tenant.id), tenants.count_active_keys(tenant.id)
            )
        self._ctx.on_change()
        return record

    def create_api_key(self, tenant_name: str, actor: str) -> NewApiKey:
        key_id, secret, full_key = new_key()
        secret_hash = hash_secret(secret)  # slow on purpose: before the transaction opens
        now = self._ctx.clock()
        with self._ctx.sessions.begin() as session:
            tenant = _require_tenant(TenantRepository(session), tenant_name, for_update=True)
            if tenant.state != TenantState.ACTIVE:
                raise precondition(f"tenant {tenant_name!r} is disabled; it cannot get new keys")
            ApiKeyRepository(session).add(tenant.id, key_id, secret_hash, now)
            KeyTableGeneration(session).bump()
            AuditRepository(session).record(
                actor, "api_key.create", key_id, now, {"tenant": tenant_name}
            )
        self._ctx.on_change()
        return NewApiKey(key_id=key_id, secret=secret, api_key=full_key, tenant=tenant_name)

    def revoke_api_key(self, key_id: str, actor: str) -> ApiKeyRecord:
        check_text("key_id", key_id, ApiKey.key_id)
        now = self._ctx.clock()
        with self._ctx.sessions.begin() as session:
            found = ApiKeyRepository(session).get(key_id, for_update=True)
            if found is None:
                raise not_found(f"no API key with id {key_id!r}")
            key, tenant = found
            if key.revoked_at is None:
                key.revoked_at = now
                KeyTableGeneration(session).bump()
                AuditRepository(session).record(
                    actor, "api_key.revoke", key_id, now, {"tenant": tenant.name}
                )
            record = _key_record(key, tenant.name)
        self._ctx.on_change()
        return record

    def list_api_keys(self, tenant_name: str) -> list[ApiKeyRecord]:
        with self._ctx.sessions.begin() as session:
            tenant_id = None
            if tenant_name:
                tenant_id = _require_tenant(TenantRepository(session), tenant_name).id
            return [_key_record(k, n) for k, n in ApiKeyRepository(session).list(tenant_id)]

    def authenticate(self, api_key: str, peer: str = "") -> str:
        """The tenant of a valid key of an active tenant; UNAUTHENTICATED otherwise.

        Revocation and the tenant's state are read on every call; the scrypt check runs
        once per presented key and stored hash (see KeyVerdicts). RESOURCE_EXHAUSTED
        after too many failures for the key id or from `peer` (a gRPC peer string),
        UNAVAILABLE when the scrypt pool is full. Blocks while scrypt runs; on an event
        loop use `authenticate_async`.
        """
        step = self._begin(api_key, peer)
        if isinstance(step, str):
            return step
        return self._finish(step, self._submit(step).result())

    async def authenticate_async(self, api_key: str, peer: str = "") -> str:
        """`authenticate` for the event loop: the database read in a worker thread, then
        scrypt awaited on the guard's pool, so no worker thread waits on scrypt."""
        step = await asyncio.to_thread(self._begin, api_key, peer)
        if isinstance(step, str):
            return step
        return self._finish(step, await asyncio.wrap_future(self._submit(step)))

    def _begin(self, api_key: str, peer: str) -> str | _Pending:
        """The tenant when the verdict is known, else what scrypt must check. Raises
        ServiceError for a refusal, before the database read when the caller is over
        its failure limit (a key accepted before is not held back)."""
        try:
            parsed = parse_key(api_key)
        except KeyFormatError as exc:
            raise ServiceError(ErrorCode.UNAUTHENTICATED, f"malformed API key: {exc}") from exc
        digest = hashlib.sha256(api_key.encode()).digest()
        host = peer_host(peer)
        if not self._verdicts.accepted(digest):
            try:
                self.guard.check(parsed.key_id, host)
            except TooManyFailures as exc:
                raise ServiceError(ErrorCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        with self._ctx.sessions.begin() as session:
            found = ApiKeyRepository(session).get(parsed.key_id)
        if found is None or found[0].revoked_at is not None:
            raise ServiceError(ErrorCode.UNAUTHENTICATED, _REFUSED)
        key, tenant = found
        if tenant.state != TenantState.ACTIVE:
            raise ServiceError(ErrorCode.UNAUTHENTICATED, _REFUSED)
        verdict = self._verdicts.get(digest, key.key_id, key.secret_hash)
        if verdict is not None:
            if not verdict:
                raise ServiceError(ErrorCode.UNAUTHENTICATED, _REFUSED)
            return tenant.name
        return _Pending(parsed.key_id, parsed.secret, key.secret_hash, digest, tenant.name, host)

    def _submit(self, step: _Pending) -> Future[bool]:
        try:
            return self.guard.submit(step.secret, step.secret_hash, step.key_id, step.peer)
        except TooManyFailures as exc:
            raise ServiceError(ErrorCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except VerifierBusy as exc:
            raise ServiceError(ErrorCode.UNAVAILABLE, str(exc)) from exc

    def _finish(self, step: _Pending, verdict: bool) -> str:
        self._verdicts.put(step.digest, step.key_id, step.secret_hash, verdict)
        if not verdict:
            raise ServiceError(ErrorCode.UNAUTHENTICATED, _REFUSED)
        return step.tenant


def _require_tenant(tenants: TenantRepository, name: str, *, for_update: bool = False) -> Tenant:
    check_tenant_name(name)
    tenant = tenants.get(name, for_update=for_update)
    if tenant is None:
        raise not_found(f"no tenant named {name!r}; create it with CreateTenant")
    return tenant


def _tenant_record(tenant: Tenant, num_adapters: int, num_keys: int) -> TenantRecord:
    return TenantRecord(
        name=tenant.name,
        state=tenant.state,
        max_adapters=tenant.max_adapters,
        num_adapters=num_adapters,
        num_active_keys=num_keys,
        created_at=tenant.created_at,
    )


def _key_record(key: ApiKey, tenant: str) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=key.key_id,
        tenant=tenant,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
        last_used_at=key.last_used_at,
    )
