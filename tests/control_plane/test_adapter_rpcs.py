"""Adapter RPCs and their errors: registration and compatibility, listings,
retirement, resolution. A real server on real Postgres."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from safetensors.torch import load_file, save_file
from sqlalchemy import select

from control_plane.models import AdapterVersion
from loraplex.v1 import control_plane_pb2 as pb
from tests.control_plane.cp_harness import Client, ControlPlaneHandle
from tests.control_plane.rpc_helpers import BASE, code_of, register, sha256


def test_register_adapter_versions(
    with_base: Client, good_adapter: Path, other_adapter: Path
) -> None:
    admin = with_base
    v1 = register(admin, "support", good_adapter)
    assert (v1.tenant, v1.name, v1.version, v1.state) == (
        "acme",
        "support",
        1,
        pb.ADAPTER_STATE_ACTIVE,
    )
    assert (v1.rank, v1.alpha, v1.sha256) == (4, 8.0, sha256(good_adapter))
    assert list(v1.target_modules) == ["q_proj", "v_proj"] and v1.base_model == BASE
    assert v1.adapter_id == "acme/support@1" and v1.current
    again = register(admin, "support", good_adapter)  # identical content: idempotent
    assert again.version == 1
    via_uri = register(admin, "support", good_adapter, sha256=v1.sha256)
    assert via_uri.version == 1
    v2 = register(admin, "support", other_adapter)
    assert v2.version == 2 and v2.current
    adapter = admin.GetAdapter(pb.GetAdapterRequest(tenant="acme", name="support"))
    assert adapter.current_version == 2
    assert [(v.version, v.current) for v in adapter.versions] == [(2, True), (1, False)]
    via_file = admin.RegisterAdapter(
        pb.RegisterAdapterRequest(
            tenant="globex", name="f", uri=f"file://{good_adapter}", base_model=BASE
        )
    )
    assert via_file.version == 1


@pytest.mark.parametrize(
    "case",
    [
        "unknown_tenant",
        "unknown_base",
        "wrong_hidden",
        "wrong_layers",
        "rank_too_large",
        "missing_target_shape",
        "checksum",
        "missing_folder",
        "missing_weights",
        "outside_roots",
        "other_scheme",
        "relative",
        "bad_name",
    ],
)
def test_register_adapter_refusals(
    case: str,
    with_base: Client,
    adapter_root: Path,
    good_adapter: Path,
    big_rank_adapter: Path,
    wrong_hidden_adapter: Path,
    wrong_layers_adapter: Path,
    tmp_path: Path,
) -> None:
    admin = with_base
    request = pb.RegisterAdapterRequest(
        tenant="acme", name="a", uri=str(good_adapter), base_model=BASE
    )
    expect = grpc.StatusCode.FAILED_PRECONDITION
    words: tuple[str, ...] = ()
    if case == "unknown_tenant":
        request.tenant, expect, words = "nope", grpc.StatusCode.NOT_FOUND, ("nope",)
    elif case == "unknown_base":
        request.base_model, expect, words = "nope", grpc.StatusCode.NOT_FOUND, ("nope",)
    elif case == "wrong_hidden":
        request.uri, words = str(wrong_hidden_adapter), ("q_proj", "64")
    elif case == "wrong_layers":
        request.uri, words = str(wrong_layers_adapter), ("layer",)
    elif case == "rank_too_large":
        request.uri, words = str(big_rank_adapter), ("32", "16")
    elif case == "missing_target_shape":
        broken = adapter_root / f"broken-{tmp_path.name}"
        shutil.copytree(good_adapter, broken)
        tensors = load_file(broken / "adapter_model.safetensors")
        name = next(k for k in sorted(tensors) if "lora_B" in k)
        del tensors[name]
        save_file(tensors, broken / "adapter_model.safetensors")
        # Malformed whatever the base model: the caller fixes the folder.
        request.uri, expect, words = str(broken), grpc.StatusCode.INVALID_ARGUMENT, ("lora_B",)
    elif case == "checksum":
        request.sha256, words = "0" * 64, ("sha256",)
    elif case == "missing_folder":
        request.uri, expect = str(adapter_root / "does-not-exist"), grpc.StatusCode.NOT_FOUND
    elif case == "missing_weights":
        empty = adapter_root / f"empty-{tmp_path.name}"
        empty.mkdir()
        shutil.copy(good_adapter / "adapter_config.json", empty)
        request.uri, expect = str(empty), grpc.StatusCode.NOT_FOUND
        words = ("adapter_model.safetensors",)
    elif case == "outside_roots":
        outside = tmp_path / "adapter"
        shutil.copytree(good_adapter, outside)
        request.uri, expect, words = str(outside), grpc.StatusCode.PERMISSION_DENIED, ("roots",)
    elif case == "other_scheme":
        request.uri, expect, words = "s3://bucket/a", grpc.StatusCode.INVALID_ARGUMENT, ("s3",)
    elif case == "relative":
        request.uri, expect = "adapters/good", grpc.StatusCode.INVALID_ARGUMENT
    elif case == "bad_name":
        request.name, expect = "a/b", grpc.StatusCode.INVALID_ARGUMENT
    code, details = code_of(admin.RegisterAdapter, request)
    assert code == expect, details
    for word in words:
        assert word in details, details


def test_quota(admin: Client, base_dir: Path, good_adapter: Path, other_adapter: Path) -> None:
    admin.CreateTenant(pb.CreateTenantRequest(name="acme", max_adapters=1))
    admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=BASE, path=str(base_dir)))
    register(admin, "one", good_adapter)
    register(admin, "one", other_adapter)  # a new version of an existing adapter: fine
    code, details = code_of(
        admin.RegisterAdapter,
        pb.RegisterAdapterRequest(
            tenant="acme", name="two", uri=str(good_adapter), base_model=BASE
        ),
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in details


def test_list_retire_resolve(with_base: Client, good_adapter: Path, other_adapter: Path) -> None:
    admin = with_base
    for i in range(3):
        register(admin, f"a{i}", good_adapter)
    register(admin, "a0", other_adapter)
    register(admin, "b", good_adapter, tenant="globex")
    first = admin.ListAdapters(pb.ListTenantAdaptersRequest(tenant="acme", page_size=2))
    assert [a.name for a in first.adapters] == ["a0", "a1"] and first.next_page_token
    second = admin.ListAdapters(
        pb.ListTenantAdaptersRequest(tenant="acme", page_size=2, page_token=first.next_page_token)
    )
    assert [a.name for a in second.adapters] == ["a2"] and not second.next_page_token
    everyone = admin.ListAdapters(pb.ListTenantAdaptersRequest())
    assert len(everyone.adapters) == 4
    assert code_of(admin.ListAdapters, pb.ListTenantAdaptersRequest(page_token="zz"))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )

    resolved = admin.ResolveAdapter(pb.ResolveAdapterRequest(adapter="acme/a0"))
    assert (resolved.adapter_id, resolved.version, resolved.base_model) == ("acme/a0@2", 2, BASE)
    retired = admin.RetireAdapter(pb.RetireAdapterRequest(tenant="acme", name="a0", version=2))
    assert [v.version for v in retired.retired] == [2]
    assert retired.adapter.current_version == 1  # moved back to the previous active version
    assert admin.ResolveAdapter(pb.ResolveAdapterRequest(adapter="acme/a0")).version == 1
    code, details = code_of(admin.ResolveAdapter, pb.ResolveAdapterRequest(adapter="acme/a0@2"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "retired" in details
    everything = admin.RetireAdapter(pb.RetireAdapterRequest(tenant="acme", name="a0"))
    assert [v.version for v in everything.retired] == [1]
    assert everything.adapter.current_version == 0
    code, details = code_of(admin.ResolveAdapter, pb.ResolveAdapterRequest(adapter="acme/a0"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no active version" in details
    assert (
        code_of(admin.RetireAdapter, pb.RetireAdapterRequest(tenant="acme", name="a1", version=9))[
            0
        ]
        == grpc.StatusCode.NOT_FOUND
    )
    assert code_of(admin.GetAdapter, pb.GetAdapterRequest(tenant="acme", name="zz"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(admin.ResolveAdapter, pb.ResolveAdapterRequest(adapter="nonsense"))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_resolve_with_tenant_keys(
    cp: ControlPlaneHandle, with_base: Client, good_adapter: Path
) -> None:
    admin = with_base
    register(admin, "a", good_adapter)
    acme = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme")).api_key
    globex = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="globex")).api_key
    request = pb.ResolveAdapterRequest(adapter="acme/a")
    assert cp.client(acme).ResolveAdapter(request).adapter_id == "acme/a@1"
    assert code_of(cp.client(globex).ResolveAdapter, request)[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert code_of(cp.client("lpx_zz_yy").ResolveAdapter, request)[0] == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert code_of(cp.client(None).ResolveAdapter, request)[0] == (grpc.StatusCode.UNAUTHENTICATED)


def test_versions_are_immutable(with_base: Client, good_adapter: Path, sessions: Any) -> None:
    register(with_base, "a", good_adapter)
    with pytest.raises(ValueError, match="immutable"), sessions.begin() as session:
        version = session.scalars(select(AdapterVersion)).one()
        version.sha256 = "0" * 64
        session.flush()
    with sessions.begin() as session:  # lifecycle columns may change
        version = session.scalars(select(AdapterVersion)).one()
        version.failure_reason = "test"
