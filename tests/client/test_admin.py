"""`AdminClient` against a real control plane on Postgres: typed results for tenants,
keys, base models, adapters and engines; refusals as typed errors with sentences."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from loraplex.client import (
    AdapterState,
    AdminClient,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    TenantState,
    UnauthenticatedError,
)
from tests.control_plane.cp_harness import ControlPlaneHandle


def test_tenants_and_keys(admin: AdminClient, cp: ControlPlaneHandle) -> None:
    before = datetime.now(UTC)
    acme = admin.create_tenant("acme", max_adapters=5)
    assert (acme.name, acme.state, acme.max_adapters, acme.num_active_keys) == (
        "acme", TenantState.ACTIVE, 5, 0)  # fmt: skip
    assert acme.created_at is not None and acme.created_at >= before.replace(microsecond=0)
    admin.create_tenant("globex")
    with pytest.raises(AlreadyExistsError) as taken:
        admin.create_tenant("acme")
    assert "acme" in taken.value.message
    with pytest.raises(InvalidArgumentError):
        admin.create_tenant("Not A Name")
    assert [t.name for t in admin.list_tenants()] == ["acme", "globex"]

    key = admin.create_api_key("acme")
    assert key.tenant == "acme" and key.api_key.startswith(f"lpx_{key.key_id}_")
    assert key.api_key.endswith(key.secret)
    [listed] = admin.list_api_keys("acme")
    assert (listed.key_id, listed.revoked, listed.revoked_at) == (key.key_id, False, None)
    assert admin.list_api_keys("globex") == []
    revoked = admin.revoke_api_key(key.key_id)
    assert revoked.revoked and revoked.revoked_at is not None
    with pytest.raises(NotFoundError):
        admin.create_api_key("nobody")

    disabled = admin.disable_tenant("globex")
    assert disabled.state == TenantState.DISABLED
    assert {t.name: t.state for t in admin.list_tenants()}["globex"] == TenantState.DISABLED

    for token, error in (("wrong-token", UnauthenticatedError), ("", UnauthenticatedError),
                         (key.api_key, PermissionDeniedError)):  # fmt: skip
        with AdminClient(cp.address, admin_token=token) as stranger:
            with pytest.raises(error) as refused:
                stranger.list_tenants()
        assert refused.value.message  # a sentence saying which credential to send


def test_base_models_and_adapter_versions(
    admin: AdminClient,
    cp: ControlPlaneHandle,
    base_dir: Path,
    good_adapter: Path,
    other_adapter: Path,
    wrong_hidden_adapter: Path,
) -> None:
    admin.create_tenant("acme")
    model = admin.register_base_model("tiny", base_dir)
    assert (model.name, model.hidden_size, model.num_layers, model.num_engines) == (
        "tiny", 64, 2, 0)  # fmt: skip
    assert model.architecture and len(model.fingerprint) >= 16
    assert admin.list_base_models() == [model]
    with pytest.raises(AlreadyExistsError):
        admin.register_base_model("tiny", base_dir)

    v1 = admin.register_adapter("acme", "support", good_adapter, base_model="tiny")
    assert (v1.adapter_id, v1.version, v1.state, v1.current) == (
        "acme/support@1", 1, AdapterState.ACTIVE, True)  # fmt: skip
    assert (v1.rank, v1.alpha, set(v1.target_modules)) == (4, 8.0, {"q_proj", "v_proj"})
    assert len(v1.sha256) == 64 and v1.size_bytes > 0 and v1.retired_at is None
    again = admin.register_adapter("acme", "support", good_adapter, base_model="tiny")
    assert again.version == 1  # the same content is the same version
    v2 = admin.register_adapter("acme", "support", other_adapter, base_model="tiny")
    assert (v2.version, v2.current) == (2, True)
    admin.register_adapter("acme", "sales", good_adapter, base_model="tiny")
    with pytest.raises(FailedPreconditionError) as incompatible:
        admin.register_adapter("acme", "bad", wrong_hidden_adapter, base_model="tiny")
    assert "hidden" in incompatible.value.message.lower()
    with pytest.raises(NotFoundError):
        admin.register_adapter("acme", "x", good_adapter, base_model="no-such-model")

    support = admin.get_adapter("acme", "support")
    assert support.current_version == 2 and [v.version for v in support.versions] == [2, 1]
    one_per_page = admin.list_adapters("acme", page_size=1)
    assert [a.name for a in one_per_page] == [a.name for a in admin.list_adapters()]
    assert sorted(a.name for a in one_per_page) == ["sales", "support"]

    resolved = admin.resolve_adapter("acme/support")
    assert (resolved.adapter_id, resolved.version, resolved.base_model) == (
        "acme/support@2", 2, "tiny")  # fmt: skip
    assert resolved.endpoints == ()  # no engine serves it yet
    tenant_key = admin.create_api_key("acme").api_key
    with AdminClient(cp.address, admin_token=tenant_key) as application:
        assert application.resolve_adapter("acme/support") == resolved
        with pytest.raises(PermissionDeniedError):
            application.list_adapters()
    retired = admin.retire_adapter("acme", "support", version=2)
    assert [v.version for v in retired.retired] == [2]
    assert retired.retired[0].state == AdapterState.RETIRED and retired.adapter.current_version == 1
    assert admin.resolve_adapter("acme/support").adapter_id == "acme/support@1"
    assert admin.retire_adapter("acme", "support", version=2).retired == ()
    with pytest.raises(NotFoundError):
        admin.resolve_adapter("acme/nothing")
    assert admin.list_engines() == []
