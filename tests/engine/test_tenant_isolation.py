"""A tenant's key learns nothing about other tenants' adapters from the engine: another
tenant's adapter, an evicted one and one that never existed are refused alike."""

from __future__ import annotations

import grpc
import pytest

from engine.config import EngineConfig
from loraplex.keys import hash_secret, new_key
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import inference_pb2
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import running_engine


def _request(adapter: str) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        adapter=adapter,
        token_ids=inference_pb2.TokenIds(ids=[5, 6, 7]),
        sampling=inference_pb2.SamplingParams(max_new_tokens=3, ignore_eos=True),
    )


def test_other_tenants_adapters_missing_and_evicted_ones_look_the_same(
    tiny_llama31_path, tmp_path
) -> None:
    keys = {tenant: new_key() for tenant in ("acme", "globex")}
    folder = make_peft_adapter(
        tiny_llama31_path, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj"], seed=1
    )
    config = EngineConfig(
        model_path=tiny_llama31_path, port=0, kv_cache_tokens=1024, adapter_roots=(tmp_path,)
    )
    with running_engine(config) as running:
        entries = [
            admin_pb.ApiKeyEntry(key_id=key_id, secret_hash=hash_secret(secret), tenant=tenant)
            for tenant, (key_id, secret, _) in keys.items()
        ]
        running.admin.SyncApiKeys(admin_pb.SyncApiKeysRequest(generation=1, keys=entries))
        for adapter_id, tenant in (("acme-a", "acme"), ("globex-g", "globex"),
                                   ("globex-old", "globex"), ("untenanted", "")):  # fmt: skip
            running.admin.LoadAdapter(
                admin_pb.LoadAdapterRequest(adapter_id=adapter_id, path=str(folder), tenant=tenant)
            )
        running.admin.EvictAdapter(admin_pb.EvictAdapterRequest(adapter_id="globex-old"))
        acme = [("authorization", f"Bearer {keys['acme'][2]}")]
        assert running.generate(_request("acme-a"), metadata=acme).completion_tokens == 3

        sentences = set()
        for name in ("globex-g", "globex-old", "never-existed", "untenanted"):
            with pytest.raises(grpc.RpcError) as caught:
                running.generate(_request(name), metadata=acme)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, name
            sentences.add(caught.value.details().replace(repr(name), "NAME"))
            assert "/" not in caught.value.details().replace("tenant/name", "")  # no paths
        assert len(sentences) == 1, sentences
        globex = [("authorization", f"Bearer {keys['globex'][2]}")]
        assert running.generate(_request("globex-g"), metadata=globex).completion_tokens == 3


def test_one_tenants_burst_is_capped_and_other_tenants_still_get_in(
    tiny_llama31_path,
) -> None:
    """With a cap of 2 requests per tenant, acme's burst of 6 long streams gets 4
    RESOURCE_EXHAUSTED refusals with a sentence; globex is served meanwhile, and acme
    gets in again once its streams are done."""
    import threading

    keys = {tenant: new_key() for tenant in ("acme", "globex")}
    config = EngineConfig(
        model_path=tiny_llama31_path, port=0, kv_cache_tokens=1024, max_tenant_requests=2
    )
    with running_engine(config) as running:
        entries = [
            admin_pb.ApiKeyEntry(key_id=key_id, secret_hash=hash_secret(secret), tenant=tenant)
            for tenant, (key_id, secret, _) in keys.items()
        ]
        running.admin.SyncApiKeys(admin_pb.SyncApiKeysRequest(generation=1, keys=entries))
        acme = [("authorization", f"Bearer {keys['acme'][2]}")]
        globex = [("authorization", f"Bearer {keys['globex'][2]}")]
        long_request = _request("")
        long_request.sampling.max_new_tokens = 200
        held = [running.inference.Generate(long_request, metadata=acme) for _ in range(2)]
        for stream in held:
            next(stream)  # both are in flight now
        refusals = []

        def burst() -> None:
            try:
                running.generate(long_request, metadata=acme)
            except grpc.RpcError as exc:
                refusals.append((exc.code(), exc.details()))

        threads = [threading.Thread(target=burst) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [code for code, _ in refusals] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
        assert "tenant 'acme' already has 2 requests in flight" in refusals[0][1]
        assert running.generate(_request(""), metadata=globex).completion_tokens == 3
        for stream in held:
            stream.cancel()
        deadline = 50
        while deadline:  # the cancelled calls give their places back
            try:
                assert running.generate(_request(""), metadata=acme).completion_tokens == 3
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                deadline -= 1
                threading.Event().wait(0.1)
        assert deadline, "acme never got in again"
