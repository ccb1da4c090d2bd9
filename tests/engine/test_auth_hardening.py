"""Auth and admin hardening of one engine (issue 8): failed key verifications are
limited per key id and per peer and run on a bounded scrypt pool; EngineAdmin without an
admin token answers loopback callers only; LoadAdapter needs adapter roots; an engine
under a control plane takes no untenanted adapters and no --adapter-dir."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from engine.config import EngineConfig
from engine.server.auth import ApiKeyTable, AuthError
from loraplex.admin_token import is_loopback
from loraplex.key_guard import GuardLimits, KeyGuard
from loraplex.keys import hash_secret, new_key
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import engine_admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import collect, running_engine

FAST = {"n": 2**10, "r": 8, "p": 1}  # cheap scrypt for tests of the limits' logic
TOKEN = "engine-admin-token-of-32-characters"


@dataclass(frozen=True)
class Entry:
    key_id: str
    secret_hash: str
    tenant: str


def text_request(max_new_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        text="The quick brown fox jumps over the lazy dog",  # tokenized in a worker thread
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


def bearer(api_key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")]


def test_a_flood_of_wrong_secrets_stops_at_the_limit_while_good_keys_stream(
    tiny_llama31_path,
) -> None:
    """100 wrong secrets for a tenant's key id, 16 at a time: at most 10 reach scrypt,
    the rest are refused RESOURCE_EXHAUSTED with a retry time; meanwhile a stream of a
    good key (whose prompt is tokenized in a worker thread) finishes in full within a
    bound, and a key never seen before is still verified and accepted."""
    acme_id, acme_secret, acme_key = new_key()
    globex_id, globex_secret, globex_key = new_key()
    config = EngineConfig(model_path=tiny_llama31_path, port=0, kv_cache_tokens=1024)
    with running_engine(config) as running:
        entries = [
            admin_pb.ApiKeyEntry(key_id=acme_id, secret_hash=hash_secret(acme_secret), tenant="a"),
            admin_pb.ApiKeyEntry(
                key_id=globex_id, secret_hash=hash_secret(globex_secret), tenant="g"
            ),
        ]
        running.admin.SyncApiKeys(admin_pb.SyncApiKeysRequest(generation=1, keys=entries))
        assert running.generate(text_request(4), bearer(acme_key)).completion_tokens == 4
        start = time.monotonic()
        assert running.generate(text_request(24), bearer(acme_key)).completion_tokens == 24
        quiet_s = time.monotonic() - start

        def wrong(i: int) -> tuple[grpc.StatusCode, str]:
            forged = f"lpx_{acme_id}_{i:040x}"
            try:
                running.generate(text_request(2), bearer(forged))
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
            return grpc.StatusCode.OK, ""

        with ThreadPoolExecutor(16) as pool:
            flood = [pool.submit(wrong, i) for i in range(100)]
            start = time.monotonic()
            streamed = running.generate(text_request(24), bearer(acme_key))
            flooded_s = time.monotonic() - start
            refusals = [f.result() for f in flood]
        assert streamed.completion_tokens == 24
        assert flooded_s < quiet_s + 5.0, (quiet_s, flooded_s)
        codes = {code for code, _ in refusals}
        assert codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        limited = [d for c, d in refusals if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(limited) >= 90
        assert f"too many failed attempts for API key {acme_id}; retry in" in limited[0]
        registry = running.parts.metrics.registry
        runs = registry.get_sample_value(
            "loraplex_engine_key_verifications_total", {"outcome": "refused"}
        )
        assert runs <= GuardLimits().failures_per_key
        assert registry.get_sample_value(
            "loraplex_engine_key_attempts_refused_total", {"reason": "too_many_failures"}
        ) == len(limited)
        # Other keys, even from the same address, are verified as before.
        assert running.generate(text_request(2), bearer(globex_key)).completion_tokens == 2


def make_table(limits: GuardLimits, clock) -> tuple[ApiKeyTable, dict[str, tuple[str, Entry]]]:
    table = ApiKeyTable(guard=KeyGuard(limits, clock=clock), clock=clock)
    keys = {}
    for name in ("k1", "k2", "k3", "k4"):
        key_id, secret, full = new_key()
        keys[name] = (full, Entry(key_id, hash_secret(secret, **FAST), "acme"))
    table.sync([entry for _, entry in keys.values()], 1)
    return table, keys


def forged(full: str) -> str:
    return full[:-4] + ("0000" if not full.endswith("0000") else "1111")


def refusal(table: ApiKeyTable, key: str, peer: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        table.authenticate(f"Bearer {key}", peer)
    return caught.value


def test_limits_per_peer_and_per_key_id_hold_back_scrypt_until_the_window_ends() -> None:
    now = [1000.0]
    limits = GuardLimits(failures_per_key=2, failures_per_peer=3, window_s=60)
    table, keys = make_table(limits, lambda: now[0])
    peer_a, peer_b = "ipv4:10.0.0.1:4001", "ipv4:10.0.0.2:4002"
    assert table.authenticate(f"Bearer {keys['k1'][0]}", peer_b) == "acme"  # cached from now
    for name in ("k1", "k2", "k3"):  # three failures from peer A, on three key ids
        assert refusal(table, forged(keys[name][0]), peer_a).code == grpc.StatusCode.UNAUTHENTICATED
    runs = table.guard.num_verifications
    held = refusal(table, keys["k4"][0], "ipv4:10.0.0.1:5999")  # same address, other port
    assert held.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "API keys from this address; retry in 60s" in held.message
    assert table.guard.num_verifications == runs  # refused before scrypt
    assert table.authenticate(f"Bearer {keys['k1'][0]}", peer_a) == "acme"  # known: not held
    assert table.authenticate(f"Bearer {keys['k4'][0]}", peer_b) == "acme"  # other address

    refusal(table, forged(keys["k2"][0]) + "9", peer_b)  # k2's second failure
    held = refusal(table, keys["k2"][0], "ipv4:10.0.0.3:1")  # the right secret, too late
    assert held.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"API key {keys['k2'][1].key_id}; retry in" in held.message
    now[0] += 61  # the windows end
    assert table.authenticate(f"Bearer {keys['k2'][0]}", peer_a) == "acme"


def test_the_scrypt_pool_refuses_rather_than_queueing_without_limit() -> None:
    """One scrypt thread and one queued verification: a third key presented at once is
    refused UNAVAILABLE at once; the two others are verified and later keys go on."""
    limits = GuardLimits(workers=1, max_queued=1)
    table = ApiKeyTable(guard=KeyGuard(limits))
    keys = []
    for tenant in ("a", "b", "c"):
        key_id, secret, full = new_key()
        keys.append((full, Entry(key_id, hash_secret(secret, n=2**15), tenant)))
    table.sync([entry for _, entry in keys], 1)

    async def at_once() -> list[str | BaseException]:
        calls = [table.authenticate_async(f"Bearer {full}", "ipv4:10.0.0.9:1") for full, _ in keys]
        return await asyncio.gather(*calls, return_exceptions=True)

    first, second, third = asyncio.run(at_once())
    assert (first, second) == ("a", "b")
    assert isinstance(third, AuthError) and third.code == grpc.StatusCode.UNAVAILABLE
    assert "retry in a moment" in third.message
    assert table.authenticate(f"Bearer {keys[2][0]}") == "c"


def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent: this picks a route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_engine_admin_without_a_token_answers_loopback_callers_only(tiny_llama31_path) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    config = EngineConfig(model_path=tiny_llama31_path, host="0.0.0.0", port=0, kv_cache_tokens=512)
    with running_engine(config) as running:
        assert running.admin.GetEngineInfo(admin_pb.GetEngineInfoRequest()).boot_id  # loopback
        with grpc.insecure_channel(f"{address}:{running.port}") as channel:
            remote = engine_admin_pb2_grpc.EngineAdminStub(channel)
            for call, request in (
                (remote.GetEngineInfo, admin_pb.GetEngineInfoRequest()),
                (remote.SyncApiKeys, admin_pb.SyncApiKeysRequest(generation=9)),
                (remote.LoadAdapter, admin_pb.LoadAdapterRequest(adapter_id="x", path="/x")),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "--admin-token" in caught.value.details()
            # Inference is not admin: it still answers callers from elsewhere.
            request = inference_pb2.GenerateRequest(
                token_ids=inference_pb2.TokenIds(ids=[5, 6]),
                sampling=inference_pb2.SamplingParams(max_new_tokens=2, ignore_eos=True),
            )
            stream = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=30)
            assert collect(stream).completion_tokens == 2
        assert running.parts.keys.generation == 0  # the remote SyncApiKeys did nothing


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.3.2.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/run/engine.sock", True),
        ("ipv4:10.1.2.3:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv6:[::ffff:10.1.2.3]:5000", False),
        ("", False),
    ],
)
def test_which_peers_are_loopback(peer: str, local: bool) -> None:
    assert is_loopback(peer) is local


def test_load_adapter_by_path_needs_adapter_roots(tiny_llama31_path, tmp_path) -> None:
    folder = make_peft_adapter(
        tiny_llama31_path, tmp_path / "dir" / "a", r=4, alpha=8, target_modules=["q_proj"], seed=1
    )
    outside = make_peft_adapter(
        tiny_llama31_path, tmp_path / "other", r=4, alpha=8, target_modules=["q_proj"], seed=2
    )
    config = EngineConfig(model_path=tiny_llama31_path, port=0, kv_cache_tokens=512)
    with running_engine(config) as running:
        with pytest.raises(grpc.RpcError) as caught:
            running.admin.LoadAdapter(admin_pb.LoadAdapterRequest(adapter_id="a", path=str(folder)))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = caught.value.details()
        assert "--adapter-root" in details and "LORAPLEX_ADAPTER_ROOTS" in details
    # --adapter-dir is a root: LoadAdapter may read under it, and only there.
    config = EngineConfig(
        model_path=tiny_llama31_path, port=0, kv_cache_tokens=512, adapter_dir=tmp_path / "dir"
    )
    with running_engine(config) as running:
        reply = running.admin.LoadAdapter(
            admin_pb.LoadAdapterRequest(adapter_id="again", path=str(folder))
        )
        assert reply.outcome == admin_pb.LOAD_OUTCOME_LOADED
        with pytest.raises(grpc.RpcError) as caught:
            running.admin.LoadAdapter(
                admin_pb.LoadAdapterRequest(adapter_id="o", path=str(outside))
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_under_a_control_plane_no_adapter_is_without_a_tenant(tiny_llama31_path, tmp_path) -> None:
    under_cp = {"control_plane": "127.0.0.1:9", "admin_token": TOKEN}  # never answers
    with pytest.raises(ValueError, match="--adapter-dir cannot be used with --control-plane"):
        EngineConfig(model_path=tiny_llama31_path, adapter_dir=tmp_path, **under_cp)
    folder = make_peft_adapter(
        tiny_llama31_path, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj"], seed=1
    )
    config = EngineConfig(
        model_path=tiny_llama31_path,
        port=0,
        kv_cache_tokens=512,
        adapter_roots=(tmp_path,),
        **under_cp,
    )
    admin = [("authorization", f"Bearer {TOKEN}")]
    with running_engine(config) as running:
        with pytest.raises(grpc.RpcError) as caught:
            running.admin.LoadAdapter(
                admin_pb.LoadAdapterRequest(adapter_id="a", path=str(folder)), metadata=admin
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs tenant" in caught.value.details()
        reply = running.admin.LoadAdapter(
            admin_pb.LoadAdapterRequest(adapter_id="a", path=str(folder), tenant="acme"),
            metadata=admin,
        )
        assert reply.outcome == admin_pb.LOAD_OUTCOME_LOADED
