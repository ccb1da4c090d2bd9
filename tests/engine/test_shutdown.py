"""SIGTERM on a real `loraplex engine serve` process: drain, then exit 0."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.v1 import inference_pb2, inference_pb2_grpc
from tests.engine_server import start_engine_process
from tests.ports import free_port


def _request(max_new_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=[5, 6, 7]),
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


@pytest.mark.parametrize("frontend", ["off", "on"])  # on: the public port is another process's
def test_sigterm_drains_in_flight_streams_refuses_new_ones_and_exits_0(tiny_llama31_path, frontend):
    port = free_port()
    process = start_engine_process(
        tiny_llama31_path, port,
        "--kv-cache-tokens", "2048", "--shutdown-grace", "60", "--frontend-process", frontend,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = inference_pb2_grpc.InferenceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        stream = stub.Generate(_request(400))
        first = next(stream)
        received = [len(first.token_ids)]
        finals = []

        def drain_stream() -> None:
            for response in stream:
                received.append(len(response.token_ids))
                if response.finish_reason:
                    finals.append(response.finish_reason)

        reader = threading.Thread(target=drain_stream)
        reader.start()
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        status = health_pb2.HealthCheckResponse.SERVING
        while status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest()).status
            time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            list(stub.Generate(_request(3)))
            refused = None
        except grpc.RpcError as exc:
            refused = exc
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.details()
        reader.join(timeout=120)
        assert sum(received) == 400 and finals == [inference_pb2.FINISH_REASON_LENGTH]
        assert process.wait(timeout=60) == 0, process.stdout.read()[-3000:]
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
