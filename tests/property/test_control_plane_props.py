"""Random requests to every ControlPlane RPC, on a real control plane over real Postgres:
each gets an answer or a clean refusal with a sentence (never INTERNAL/UNKNOWN, never
a hang), and afterwards the control plane still reads, writes and resolves."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from control_plane import migrate
from control_plane.config import ControlPlaneConfig
from control_plane.reconciler.config import ReconcilerConfig
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import control_plane_pb2_grpc as pb_grpc
from loraplex.v1 import engine_admin_pb2 as admin_pb
from tests.adapter_factory import make_peft_adapter
from tests.control_plane.conftest import create_database, drop_database
from tests.control_plane.cp_harness import ADMIN_TOKEN, ControlPlaneHandle, running_control_plane
from tests.property.checks import RATE_LIMITED, call_cleanly, check_refusal, property_settings
from tests.property.strategies import (
    TRICKY_STRINGS,
    ascii_metadata,
    lists,
    name_like,
    text,
    uint32,
    uint64,
)

BASE = "tiny"
FUZZED_TENANTS = ("acme", "globex")  # the examples may disable these, retire, revoke...
KEEPER = "keeper"  # ...but never name this one: the serving check uses it


@dataclass
class ServedControlPlane:
    handle: ControlPlaneHandle
    root: Path
    good: Path
    keeper_key: str
    key_ids: list[str]

    def admin(self) -> Any:
        return self.handle.client()


def _hostile_folders(root: Path, model: Path) -> dict[str, Path]:
    """Folders under the adapter root that cannot hold an adapter (or a model): FIFOs
    (a read would block forever) and links to system files."""
    folders = {name: root / name for name in ("fifo", "links", "empty", "model_fifo")}
    for folder in folders.values():
        folder.mkdir()
    os.mkfifo(folders["fifo"] / "adapter_config.json")
    os.mkfifo(folders["fifo"] / "adapter_model.safetensors")
    (folders["links"] / "adapter_config.json").symlink_to("/etc/hostname")
    (folders["links"] / "adapter_model.safetensors").symlink_to("/dev/zero")
    (folders["model_fifo"] / "config.json").write_text((model / "config.json").read_text())
    os.mkfifo(folders["model_fifo"] / "model.safetensors")
    return folders


@pytest.fixture(scope="module")
def served_cp(
    tiny_llama31_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedControlPlane]:
    root = tmp_path_factory.mktemp("property-cp-adapters")
    good = make_peft_adapter(
        tiny_llama31_path, root / "good", r=4, alpha=8, target_modules=["q_proj"], seed=3
    )
    _hostile_folders(root, tiny_llama31_path)
    url = create_database()
    migrate.upgrade(url)
    config = ControlPlaneConfig(
        database_url=url,
        admin_token=ADMIN_TOKEN,
        adapter_roots=(root,),
        host="127.0.0.1",
        port=0,
        default_max_lora_rank=16,
        reconciler=ReconcilerConfig(interval_s=60),
    )
    try:
        with running_control_plane(config) as handle:
            admin = handle.client()
            for tenant in (*FUZZED_TENANTS, KEEPER):
                admin.CreateTenant(pb.CreateTenantRequest(name=tenant))
            admin.RegisterBaseModel(
                pb.RegisterBaseModelRequest(name=BASE, path=str(tiny_llama31_path))
            )
            for tenant in (*FUZZED_TENANTS, KEEPER):
                admin.RegisterAdapter(
                    pb.RegisterAdapterRequest(
                        tenant=tenant, name="good", uri=str(good), base_model=BASE
                    )
                )
            keeper = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=KEEPER))
            key_ids = [
                admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=t)).key_id for t in FUZZED_TENANTS
            ]
            served = ServedControlPlane(handle, root, good, keeper.api_key, key_ids)
            assert_cp_still_serving(served)  # verifies the keeper's key before any flood
            yield served
    finally:
        drop_database(url)


def assert_cp_still_serving(served: ServedControlPlane) -> None:
    """Reads, writes and the tenant path all still work after a batch of examples."""
    admin = served.admin()
    adapter = admin.GetAdapter(pb.GetAdapterRequest(tenant=KEEPER, name="good"))
    assert adapter.current_version == 1
    assert KEEPER in [t.name for t in admin.ListTenants(pb.ListTenantsRequest()).tenants]
    fresh = f"t{os.urandom(6).hex()}"
    assert admin.CreateTenant(pb.CreateTenantRequest(name=fresh)).name == fresh
    resolved = served.handle.client(served.keeper_key).ResolveAdapter(
        pb.ResolveAdapterRequest(adapter=f"{KEEPER}/good")
    )
    assert resolved.adapter_id == f"{KEEPER}/good@1"


def _tenants() -> st.SearchStrategy[str]:
    return name_like(*FUZZED_TENANTS, "nobody")


def _adapter_names() -> st.SearchStrategy[str]:
    return name_like("good", "gone")


def _timestamps() -> st.SearchStrategy[Timestamp]:
    seconds = st.one_of(
        st.integers(-(2**63), 2**63 - 1), st.integers(0, 2**34), st.sampled_from((0, -1))
    )
    nanos = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(0, 999_999_999))
    return st.builds(Timestamp, seconds=seconds, nanos=nanos)


def _engine_infos() -> st.SearchStrategy[admin_pb.EngineInfo]:
    return st.builds(
        admin_pb.EngineInfo,
        boot_id=text(),
        model_name=text(),
        model_fingerprint=text(),
        max_loras=uint32(),
        max_lora_rank=uint32(),
        max_cpu_loras=uint32(),
        device=text(),
        dtype=text(),
        kv_blocks_total=uint32(),
        kv_blocks_free=uint32(),
        max_model_len=uint32(),
        running_requests=uint32(),
        waiting_requests=uint32(),
        num_adapters=uint32(),
        architecture=text(),
    )


def _paths(served: ServedControlPlane) -> st.SearchStrategy[str]:
    root = served.root
    local = [str(root / n) for n in ("good", "fifo", "links", "empty", "model_fifo", "nope")]
    hostile = ["/", "/etc", "/proc/self", "/dev/zero", "/dev", str(root), str(root / "..")]
    uris = [f"file://{p}" for p in local] + [f"file://localhost{local[0]}", "file:/etc"]
    return st.one_of(st.sampled_from(local + hostile + uris), text())


def _request_strategies(served: ServedControlPlane) -> dict[str, st.SearchStrategy[Any]]:
    sha_good = hashlib.sha256((served.good / "adapter_model.safetensors").read_bytes())
    shas = st.one_of(st.sampled_from((sha_good.hexdigest(), "0" * 64, "Z" * 64)), text())
    key_ids = st.one_of(st.sampled_from(served.key_ids), text())
    page_tokens = st.one_of(
        st.sampled_from(("1", "0", "-1", "99999999999999999999", "\u0661\u0662", "１")), text()
    )
    refs = st.one_of(
        st.sampled_from([f"{t}/good" for t in FUZZED_TENANTS] + list(TRICKY_STRINGS)),
        st.tuples(_tenants(), _adapter_names(), uint64()).map(lambda t: f"{t[0]}/{t[1]}@{t[2]}"),
        text(),
    )
    return {
        "CreateTenant": st.builds(pb.CreateTenantRequest, name=_tenants(), max_adapters=uint32()),
        "ListTenants": st.just(pb.ListTenantsRequest()),
        "DisableTenant": st.builds(pb.DisableTenantRequest, name=_tenants()),
        "CreateApiKey": st.builds(pb.CreateApiKeyRequest, tenant=_tenants()),
        "RevokeApiKey": st.builds(pb.RevokeApiKeyRequest, key_id=key_ids),
        "ListApiKeys": st.builds(pb.ListApiKeysRequest, tenant=_tenants()),
        "RegisterBaseModel": st.builds(
            pb.RegisterBaseModelRequest,
            name=name_like(BASE, "other"),
            path=_paths(served),
            max_lora_rank=uint32(),
        ),
        "ListBaseModels": st.just(pb.ListBaseModelsRequest()),
        "RegisterAdapter": st.builds(
            pb.RegisterAdapterRequest,
            tenant=_tenants(),
            name=_adapter_names(),
            uri=_paths(served),
            base_model=name_like(BASE),
            sha256=shas,
            replicas=uint32(),
        ),
        "GetAdapter": st.builds(pb.GetAdapterRequest, tenant=_tenants(), name=_adapter_names()),
        "ListAdapters": st.builds(
            pb.ListTenantAdaptersRequest,
            tenant=st.one_of(st.just(""), _tenants()),
            page_size=uint32(),
            page_token=page_tokens,
        ),
        "RetireAdapter": st.builds(
            pb.RetireAdapterRequest, tenant=_tenants(), name=_adapter_names(), version=uint32()
        ),
        "RegisterEngine": st.builds(
            pb.RegisterEngineRequest,
            address=st.one_of(st.sampled_from(("127.0.0.1:1", "[::1]:2", "h:99999")), text()),
            info=_engine_infos(),
        ),
        "Heartbeat": st.builds(
            pb.HeartbeatRequest,
            engine_id=uint64(),
            boot_id=text(),
            info=_engine_infos(),
            key_usage=lists(
                st.builds(pb.KeyUsage, key_id=key_ids, last_used_at=_timestamps()),
                pb.KeyUsage(key_id="k"),
                max_huge=20_000,
            ),
        ),
        "ListEngines": st.just(pb.ListEnginesRequest()),
        "ResolveAdapter": st.builds(pb.ResolveAdapterRequest, adapter=refs),
    }


RPCS = (
    "CreateTenant", "ListTenants", "DisableTenant", "CreateApiKey", "RevokeApiKey",
    "ListApiKeys", "RegisterBaseModel", "ListBaseModels", "RegisterAdapter", "GetAdapter",
    "ListAdapters", "RetireAdapter", "RegisterEngine", "Heartbeat", "ListEngines",
    "ResolveAdapter",
)  # fmt: skip


def test_every_rpc_is_covered() -> None:
    service = pb.DESCRIPTOR.services_by_name["ControlPlane"]
    assert sorted(RPCS) == sorted(m.name for m in service.methods)


@pytest.mark.parametrize("rpc", RPCS)
def test_random_requests_get_a_clean_answer(served_cp: ServedControlPlane, rpc: str) -> None:
    strategy = _request_strategies(served_cp)[rpc]
    call: Callable[..., Any] = getattr(served_cp.admin(), rpc)
    examples = 6 if rpc.startswith("List") else 25

    @property_settings(max_examples=examples)
    @given(request=strategy)
    def run(request: Any) -> None:
        call_cleanly(call, request, rpc)

    run()
    assert_cp_still_serving(served_cp)


def test_random_credentials_get_a_clean_refusal(served_cp: ServedControlPlane) -> None:
    """Any authorization value but the admin token is refused on admin RPCs, and on
    ResolveAdapter anything but a tenant's key or the admin token."""
    stub = pb_grpc.ControlPlaneStub(served_cp.handle.channel)  # sends its own metadata

    @property_settings(max_examples=40)
    @given(authorization=ascii_metadata(), rpc=st.sampled_from(("ListTenants", "ResolveAdapter")))
    def run(authorization: str, rpc: str) -> None:
        request = (
            pb.ListTenantsRequest()
            if rpc == "ListTenants"
            else pb.ResolveAdapterRequest(adapter=f"{KEEPER}/good")
        )
        metadata = (("authorization", authorization),) if authorization else ()
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, rpc)(request, metadata=metadata, timeout=30)
        code = check_refusal(caught.value, rpc, also_ok=RATE_LIMITED)
        assert code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            *RATE_LIMITED,
        )

    run()
    assert_cp_still_serving(served_cp)


@pytest.mark.parametrize("folder", ["fifo", "links", "empty", "model_fifo"])
def test_hostile_folders_are_refused_without_hanging(
    served_cp: ServedControlPlane, folder: str
) -> None:
    """Every hostile folder is tried here, whatever the random draws above picked."""
    admin = served_cp.admin()
    path = str(served_cp.root / folder)
    for call, request in (
        (admin.RegisterBaseModel, pb.RegisterBaseModelRequest(name=f"m-{folder}", path=path)),
        (
            admin.RegisterAdapter,
            pb.RegisterAdapterRequest(tenant="acme", name=folder, uri=path, base_model=BASE),
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        check_refusal(caught.value, f"{type(request).__name__}({folder})")
    assert_cp_still_serving(served_cp)
