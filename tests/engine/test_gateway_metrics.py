"""The gauges of the Gateway API Inference Extension's model-server protocol, scraped
from a real engine while one adapter's request runs and another's waits."""

from __future__ import annotations

import time
import urllib.request

from loraplex.v1 import inference_pb2
from tests.engine.http_engine import HttpEngine, http_engine
from tests.metrics_scrape import Samples, parse, scrape, value
from tests.ports import free_port


def _request(adapter: str) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        adapter=adapter,
        token_ids=inference_pb2.TokenIds(ids=[5, 6, 7]),
        sampling=inference_pb2.SamplingParams(max_new_tokens=900, ignore_eos=True),
    )


def _lora_info(samples: Samples) -> tuple[dict[str, str], float]:
    (labels, sample_value), = [
        (dict(labels), v) for (name, labels), v in samples.items()
        if name == "vllm:lora_requests_info"
    ]  # fmt: skip
    return labels, sample_value


def _wait_for(port: int, model: str, running: int, waiting: int) -> Samples:
    """The first scrape with these request counts (or the last one, after 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        samples = scrape(port)
        counts = (
            value(samples, "vllm:num_requests_running", model_name=model),
            value(samples, "vllm:num_requests_waiting", model_name=model),
        )
        if counts == (running, waiting) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def test_waiting_running_kv_usage_and_lora_adapters_as_the_gateway_reads_them(
    tiny_llama31_path, tmp_path
) -> None:
    metrics_port = free_port()
    # One sequence at a time: a second request must wait, with its adapter.
    with http_engine(
        tiny_llama31_path, tmp_path, max_num_seqs=1, max_loras=2, metrics_port=metrics_port
    ) as engine:
        _check(engine, metrics_port)


def _check(engine: HttpEngine, port: int) -> None:
    model = engine.base_model
    idle = scrape(port)
    assert value(idle, "vllm:num_requests_running", model_name=model) == 0
    assert value(idle, "vllm:num_requests_waiting", model_name=model) == 0
    assert value(idle, "vllm:kv_cache_usage_perc", model_name=model) == 0
    labels, _ = _lora_info(idle)
    assert labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "2"}

    acme = engine.running.inference.Generate(
        _request("acme/pirate"), metadata=engine.grpc_auth("acme")
    )
    next(acme)  # running now
    globex = engine.running.inference.Generate(
        _request("globex/g"), metadata=engine.grpc_auth("globex")
    )
    try:
        before = time.time()
        busy = _wait_for(port, model, running=1, waiting=1)
        assert value(busy, "vllm:num_requests_waiting", model_name=model) == 1
        assert value(busy, "vllm:num_requests_running", model_name=model) == 1
        labels, stamp = _lora_info(busy)
        assert labels == {
            "running_lora_adapters": "acme/pirate,acme/pirate@1",  # every name a client uses
            "waiting_lora_adapters": "globex/g,globex/g@1",
            "max_lora": "2",
        }
        assert before - 1 <= stamp <= time.time() + 1  # the time of the report
        usage = value(busy, "vllm:kv_cache_usage_perc", model_name=model)
        total = value(busy, "loraplex_engine_kv_blocks_total")
        free = value(busy, "loraplex_engine_kv_blocks_free")
        assert 0 < usage < 1
        assert abs(usage - (total - free) / total) <= 1 / total  # a block may fill meanwhile
        assert value(busy, "vllm:gpu_cache_usage_perc", model_name=model) > 0  # older name

        # The HTTP port serves the same registry, where gateways scrape by default.
        url = engine.base_url + "/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            on_http = parse(reply.read().decode())
        assert value(on_http, "vllm:num_requests_running", model_name=model) == 1
    finally:
        acme.cancel()
        globex.cancel()
    done = _wait_for(port, model, running=0, waiting=0)
    assert value(done, "vllm:num_requests_running", model_name=model) == 0
    assert value(done, "vllm:num_requests_waiting", model_name=model) == 0
    assert value(done, "vllm:kv_cache_usage_perc", model_name=model) == 0
    labels, _ = _lora_info(done)
    assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == ""
