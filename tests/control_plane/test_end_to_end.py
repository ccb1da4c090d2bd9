"""End to end with real processes: `loraplex control-plane serve` and two
`loraplex engine serve` on the CPU, the tiny model, real PEFT adapters, real Postgres.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import engine_admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.control_plane.cp_harness import ADMIN_TOKEN, Client, Process
from tests.control_plane.test_reconciler import wait_for
from tests.ports import free_port

pytestmark = pytest.mark.slow
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def generate(address: str, adapter: str, api_key: str) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            adapter=adapter,
            text="Hello there",
            sampling=inference_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True),
        )
        responses = list(
            stub.Generate(request, timeout=60, metadata=(("authorization", f"Bearer {api_key}"),))
        )
    assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    return "".join(r.text for r in responses)


def refusal(address: str, adapter: str, api_key: str) -> grpc.StatusCode | None:
    try:
        generate(address, adapter, api_key)
    except grpc.RpcError as exc:
        return exc.code()
    return None


def held(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        reply = engine_admin_pb2_grpc.EngineAdminStub(channel).ListAdapters(
            admin_pb.ListAdaptersRequest(), metadata=ADMIN, timeout=10
        )
    return {a.adapter_id for a in reply.adapters if not a.evicting}


def test_end_to_end(  # noqa: PLR0915 - one story, told in order
    clean_db: str,
    base_dir: Path,
    adapter_root: Path,
    good_adapter: Path,
    other_adapter: Path,
    tmp_path: Path,
    processes: list[Process],
) -> None:
    cp_port = free_port()
    cp_args = [
        "control-plane",
        "serve",
        "--database-url",
        clean_db,
        "--host",
        "127.0.0.1",
        "--port",
        str(cp_port),
        "--adapter-root",
        str(adapter_root),
        "--reconcile-interval",
        "0.5",
        "--heartbeat-timeout",
        "4",
    ]
    control = Process(cp_args, tmp_path / "control-plane.log").start()
    processes.append(control)
    channel = grpc.insecure_channel(f"127.0.0.1:{cp_port}")
    admin = Client(channel, ADMIN_TOKEN)
    grpc.channel_ready_future(channel).result(timeout=60)

    def engine_process(port: int, name: str) -> Process:
        process = Process(
            [
                "engine",
                "serve",
                "--model",
                str(base_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--kv-cache-tokens",
                "1024",
                "--max-lora-rank",
                "16",
                "--control-plane",
                f"127.0.0.1:{cp_port}",
                "--advertise",
                f"127.0.0.1:{port}",
                "--adapter-root",
                str(adapter_root),
            ],
            tmp_path / f"{name}.log",
        ).start()
        processes.append(process)
        return process

    def live_engines() -> set[str]:
        return {
            e.address
            for e in admin.ListEngines(pb.ListEnginesRequest()).engines
            if e.state == pb.ENGINE_STATE_LIVE
        }

    admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
    admin.CreateTenant(pb.CreateTenantRequest(name="globex"))
    acme = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
    globex = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="globex")).api_key
    admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", path=str(base_dir)))
    port_a, port_b = free_port(), free_port()
    a_address, b_address = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    engine_a = engine_process(port_a, "engine-a")
    wait_for(lambda: a_address in live_engines(), 90, "engine A to join")

    # Register -> loaded within seconds -> the tenant's key streams through it.
    start = time.monotonic()
    admin.RegisterAdapter(
        pb.RegisterAdapterRequest(
            tenant="acme", name="support", uri=str(good_adapter), base_model="tiny"
        )
    )
    admin.RegisterAdapter(
        pb.RegisterAdapterRequest(
            tenant="acme", name="sales", uri=str(other_adapter), base_model="tiny"
        )
    )
    wait_for(lambda: {"acme/support@1", "acme/sales@1"} <= held(a_address), 10, "loads")
    assert time.monotonic() - start < 10
    assert (
        wait_for(
            lambda: refusal(a_address, "acme/support", acme.api_key) is None,
            5,
            "the key on the engine",
        )
        is True
    )
    assert generate(a_address, "acme/support@1", acme.api_key)
    assert refusal(a_address, "acme/support", globex) == grpc.StatusCode.NOT_FOUND
    assert generate(a_address, "", globex)  # the base model is everyone's

    # Revoke -> refused within 5 s.
    admin.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=acme.key_id))
    start = time.monotonic()
    wait_for(
        lambda: refusal(a_address, "acme/support", acme.api_key) == grpc.StatusCode.UNAUTHENTICATED,
        5,
        "revocation",
    )
    assert time.monotonic() - start < 5
    key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme")).api_key

    # Retire -> evicted, and Generate says so.
    admin.RetireAdapter(pb.RetireAdapterRequest(tenant="acme", name="sales"))
    wait_for(lambda: "acme/sales@1" not in held(a_address), 10, "eviction")
    assert refusal(a_address, "acme/sales", key) in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    # Kill and restart the engine: its adapters come back with no admin action.
    engine_a.kill()
    engine_a = engine_process(port_a, "engine-a-restarted")
    wait_for(
        lambda: held(a_address) == {"acme/support@1"} if _up(a_address) else False,
        90,
        "the adapters back after the restart",
    )
    wait_for(lambda: refusal(a_address, "acme/support", key) is None, 10, "keys back")

    # Restart the control plane: nothing lost.
    control.stop()
    control = Process(cp_args, tmp_path / "control-plane-2.log").start()
    processes.append(control)
    grpc.channel_ready_future(channel).result(timeout=60)
    wait_for(lambda: _answers(admin), 60, "the control plane back")
    tenants = admin.ListTenants(pb.ListTenantsRequest()).tenants
    assert [(t.name, t.num_active_keys) for t in tenants] == [("acme", 1), ("globex", 1)]
    adapter = admin.GetAdapter(pb.GetAdapterRequest(tenant="acme", name="support"))
    assert adapter.current_version == 1
    assert generate(a_address, "acme/support", key)

    # Two engines: the adapter on both; one killed, the other keeps serving.
    engine_process(port_b, "engine-b")
    wait_for(
        lambda: _up(b_address) and "acme/support@1" in held(b_address),
        90,
        "the adapter on engine B",
    )
    resolved = admin.ResolveAdapter(pb.ResolveAdapterRequest(adapter="acme/support"))
    wait_for(
        lambda: (
            set(admin.ResolveAdapter(pb.ResolveAdapterRequest(adapter="acme/support")).endpoints)
            == {a_address, b_address}
        ),
        10,
        "both endpoints",
    )
    assert resolved.adapter_id == "acme/support@1"
    engine_a.kill()
    assert generate(b_address, "acme/support", key)
    wait_for(lambda: live_engines() == {b_address}, 15, "engine A marked stale")
    assert set(
        admin.ResolveAdapter(pb.ResolveAdapterRequest(adapter="acme/support")).endpoints
    ) == {b_address}
    channel.close()


def _up(address: str) -> bool:
    try:
        held(address)
    except grpc.RpcError:
        return False
    return True


def _answers(admin: Client) -> bool:
    try:
        admin.ListTenants(pb.ListTenantsRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return True
