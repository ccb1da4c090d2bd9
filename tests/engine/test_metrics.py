"""The engine's Prometheus metrics through the real servers: counts of started, finished
(by reason), refused (by code) requests, tokens, latencies, steps, and gauges that read
the live engine (KV blocks equal GetEngineInfo's)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from engine.config import EngineConfig
from loraplex.keys import hash_secret, new_key
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import inference_pb2
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import running_engine
from tests.metrics_scrape import Samples, render, scrape, value
from tests.ports import free_port


def scrape_until(port: int, check: Callable[[Samples], bool]) -> Samples:
    """The first scrape that passes `check`, or the last one after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def ids_request(ids: list[int], max_new_tokens: int, adapter: str = ""):
    return inference_pb2.GenerateRequest(
        adapter=adapter,
        token_ids=inference_pb2.TokenIds(ids=ids),
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


def config_for(model_path: Path, **overrides) -> EngineConfig:
    values = dict(
        model_path=model_path, port=0, kv_cache_tokens=1024, max_loras=2, max_lora_rank=16
    )
    values.update(overrides)
    return EngineConfig(**values)


def test_scraped_counts_and_gauges_after_served_cancelled_and_refused_calls(tiny_llama31_path):
    port = free_port()
    with running_engine(config_for(tiny_llama31_path, metrics_port=port)) as running:
        for prompt in ([5, 6, 7], [8, 9, 10, 11]):
            assert running.generate(ids_request(prompt, 5)).completion_tokens == 5
        stream = running.inference.Generate(ids_request(list(range(20, 40)), 400))
        next(stream)
        next(stream)
        stream.cancel()
        with pytest.raises(grpc.RpcError) as refused:
            running.generate(ids_request([1, 10**6], 4))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        finished = "loraplex_engine_requests_finished_total"
        samples = scrape_until(port, lambda s: value(s, finished, 0, tenant="", reason="cancelled"))
        info = running.admin.GetEngineInfo(admin_pb.GetEngineInfoRequest())
        steps = running.parts.engine.snapshot().steps

    assert value(samples, "loraplex_engine_requests_started_total", tenant="") == 3
    assert value(samples, finished, tenant="", reason="length") == 2
    assert value(samples, finished, tenant="", reason="cancelled") == 1
    assert value(samples, finished, 0, tenant="", reason="stop") == 0
    refused_total = "loraplex_engine_requests_refused_total"
    assert value(samples, refused_total, code="INVALID_ARGUMENT") == 1
    assert value(samples, "loraplex_engine_prompt_tokens_total", tenant="") == 3 + 4 + 20
    generated = value(samples, "loraplex_engine_generation_tokens_total", tenant="")
    assert 5 + 5 + 2 <= generated < 5 + 5 + 400
    # All three streamed tokens; the cancelled one never reached its last response.
    assert value(samples, "loraplex_engine_time_to_first_token_seconds_count") == 3
    assert value(samples, "loraplex_engine_request_duration_seconds_count") == 2
    assert value(samples, "loraplex_engine_inter_token_latency_seconds_count") >= 4 + 4 + 1
    steps_seen = sum(
        value(samples, "loraplex_engine_step_duration_seconds_count", kind=kind)
        for kind in ("prefill", "decode", "mixed")
    )
    assert steps_seen == steps == value(samples, "loraplex_engine_batch_size_seqs_count")
    assert value(samples, "loraplex_engine_step_duration_seconds_count", kind="decode") > 0
    assert value(samples, "loraplex_engine_batch_size_tokens_sum") >= 3 + 4 + 20
    # Gauges read the live engine: idle now, every block free, as GetEngineInfo says.
    assert value(samples, "loraplex_engine_kv_blocks_free") == info.kv_blocks_free
    assert value(samples, "loraplex_engine_kv_blocks_total") == info.kv_blocks_total == 1024 // 16
    assert value(samples, "loraplex_engine_requests_running") == 0
    assert value(samples, "loraplex_engine_requests_waiting") == 0
    assert value(samples, "loraplex_engine_adapter_slots_total") == 2
    assert value(samples, "loraplex_engine_adapters_loaded") == 0


def test_tenant_labels_adapter_gauges_and_auth_refusals(tiny_llama31_path, tmp_path):
    adapter = make_peft_adapter(
        tiny_llama31_path, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj"], seed=1
    )
    key_id, secret, api_key = new_key()
    with running_engine(config_for(tiny_llama31_path, adapter_roots=(tmp_path,))) as running:
        running.admin.SyncApiKeys(
            admin_pb.SyncApiKeysRequest(
                generation=1,
                keys=[
                    admin_pb.ApiKeyEntry(
                        key_id=key_id, secret_hash=hash_secret(secret), tenant="acme"
                    )
                ],
            )
        )
        running.admin.LoadAdapter(
            admin_pb.LoadAdapterRequest(adapter_id="acme-a", path=str(adapter), tenant="acme")
        )
        auth = [("authorization", f"Bearer {api_key}")]
        result = running.generate(ids_request([5, 6, 7], 3, adapter="acme-a"), metadata=auth)
        assert result.completion_tokens == 3
        with pytest.raises(grpc.RpcError) as refused:
            running.generate(ids_request([5, 6, 7], 3))  # no key
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            running.generate(ids_request([5, 6, 7], 3, adapter="nope"), metadata=auth)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        samples = render(running.parts.metrics.registry)

    assert value(samples, "loraplex_engine_requests_started_total", tenant="acme") == 1
    assert (
        value(samples, "loraplex_engine_requests_finished_total", tenant="acme", reason="length")
        == 1
    )
    assert value(samples, "loraplex_engine_generation_tokens_total", tenant="acme") == 3
    assert value(samples, "loraplex_engine_requests_refused_total", code="UNAUTHENTICATED") == 1
    assert value(samples, "loraplex_engine_requests_refused_total", code="NOT_FOUND") == 1
    assert value(samples, "loraplex_engine_adapter_slot_loads_total") == 1
    assert value(samples, "loraplex_engine_adapters_loaded") == 1
    assert value(samples, "loraplex_engine_adapters_cpu_cached") == 1
    # The adapter stays warm in its slot, with no request pinning it.
    assert value(samples, "loraplex_engine_adapter_slots_occupied") == 1
    assert value(samples, "loraplex_engine_adapter_slots_in_use") == 0
    assert not any("adapter" in dict(labels) for _, labels in samples)
