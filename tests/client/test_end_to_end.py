"""The README's story with the SDK alone: an admin sets up a tenant, a key, a base
model and an adapter; the control plane places it on a real engine; the tenant's
application streams through it; a revoked key stops working."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.client import AdminClient, Client, EngineState, FinishReason, UnauthenticatedError
from tests.client.conftest import wait_for
from tests.control_plane.cp_harness import ControlPlaneHandle
from tests.control_plane.test_reconciler import engine_config
from tests.engine_server import running_engine


def test_admin_sets_up_a_tenant_and_its_application_streams_through_its_adapter(
    cp: ControlPlaneHandle,
    admin: AdminClient,
    base_dir: Path,
    adapter_root: Path,
    good_adapter: Path,
) -> None:
    admin.create_tenant("acme")
    key = admin.create_api_key("acme")
    admin.register_base_model("tiny", base_dir)
    with running_engine(engine_config(base_dir, adapter_root, cp)) as engine:
        address = f"127.0.0.1:{engine.port}"
        [live] = wait_for(admin.list_engines, 10, "the engine to register")
        assert (live.address, live.base_model, live.state) == (address, "tiny", EngineState.LIVE)
        version = admin.register_adapter("acme", "support", good_adapter, base_model="tiny")
        wait_for(lambda: admin.resolve_adapter("acme/support").endpoints == (address,), 10,
                 "the adapter to be placed on the engine")  # fmt: skip

        with Client(address, api_key=key.api_key) as client:
            # The engine learns the key with the placement's sync; wait until it does.
            wait_for(lambda: _accepted(client), 10, "the key to reach the engine")
            tuned = client.generate_text("Hello", adapter="acme/support", max_new_tokens=8,
                                         ignore_eos=True)  # fmt: skip
            base = client.generate_text("Hello", max_new_tokens=8, ignore_eos=True)
            assert tuned.adapter_id == version.adapter_id == "acme/support@1"
            assert tuned.finish_reason == FinishReason.LENGTH and tuned.token_ids != base.token_ids
            streamed = client.generate("Hello", adapter="acme/support", max_new_tokens=8,
                                       ignore_eos=True)  # fmt: skip
            assert "".join(d.text for d in streamed) == tuned.text

            admin.revoke_api_key(key.key_id)
            wait_for(lambda: not _accepted(client), 5, "the revocation to reach the engine")
            with pytest.raises(UnauthenticatedError) as refused:
                client.generate_text("Hello", max_new_tokens=1)
            assert refused.value.message


def _accepted(client: Client) -> bool:
    try:
        client.generate_text("Hi", max_new_tokens=1)
    except UnauthenticatedError:
        return False
    return True
