"""Readiness and liveness, as gRPC health per service name and as HTTP /ready and
/health, through the transitions a CPU can reach: serving, draining after SIGTERM
(a real `loraplex engine serve` process), and a dead engine loop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.config import EngineConfig
from engine.server.probes import ADMIN_SERVICE, INFERENCE_SERVICE, LIVENESS_SERVICE
from tests.engine.http_engine import http
from tests.engine_server import running_engine
from tests.ports import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", INFERENCE_SERVICE, ADMIN_SERVICE, LIVENESS_SERVICE)


def _health(channel: grpc.Channel) -> dict[str, int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return {name: stub.Check(health_pb2.HealthCheckRequest(service=name)).status
            for name in SERVICES}  # fmt: skip


def _completion(base_url: str) -> tuple[int, dict]:
    body = {"model": "anything", "prompt": "Hi", "max_tokens": 2}
    return http("POST", base_url + "/v1/completions", body)


def test_a_dead_engine_loop_fails_liveness_and_readiness_but_not_the_admin_api(
    tiny_llama31_path,
) -> None:
    config = EngineConfig(
        model_path=tiny_llama31_path, port=0, http_port=free_port(), kv_cache_tokens=1024
    )
    base_url = f"http://127.0.0.1:{config.http_port}"
    with running_engine(config) as running:
        assert http("GET", base_url + "/health") == (200, {"status": "alive"})
        assert http("GET", base_url + "/ready") == (200, {"status": "ready"})
        assert _health(running.channel) == dict.fromkeys(SERVICES, SERVING)

        running.parts.engine.stop()  # the engine loop thread ends, the process lives on
        deadline = time.monotonic() + 10
        while http("GET", base_url + "/health")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body = http("GET", base_url + "/health")
        assert status == 503 and "engine loop has stopped" in body["status"]
        assert http("GET", base_url + "/ready")[0] == 503
        deadline = time.monotonic() + 5  # the watcher looks once a second
        while _health(running.channel)[""] == SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _health(running.channel) == {
            "": NOT_SERVING, INFERENCE_SERVICE: NOT_SERVING, LIVENESS_SERVICE: NOT_SERVING,
            ADMIN_SERVICE: SERVING,
        }  # fmt: skip
        status, body = _completion(base_url)
        assert status == 503 and "loop has stopped" in body["error"]["message"]


def test_sigterm_drains_ready_fails_health_stays_and_http_streams_finish(tiny_llama31_path):
    grpc_port, http_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "loraplex.cli", "engine", "serve", "--model",
         str(tiny_llama31_path), "--device", "cpu", "--port", str(grpc_port),
         "--http-port", str(http_port), "--kv-cache-tokens", "2048", "--shutdown-grace", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "engine ready" in line:
                break
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        assert http("GET", base_url + "/ready") == (200, {"status": "ready"})
        model = http("GET", base_url + "/v1/models")[1]["data"][0]["id"]
        connection = HTTPConnection("127.0.0.1", http_port, timeout=120)
        body = {"model": model, "prompt": "Hi", "max_tokens": 400, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
        connection.request("POST", "/v1/completions", json.dumps(body))
        reply = connection.getresponse()
        assert reply.status == 200
        events: list[bytes] = [reply.readline()]

        def read_stream() -> None:
            events.extend(line for line in reply if line.strip())

        reader = threading.Thread(target=read_stream)
        reader.start()
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while http("GET", base_url + "/ready")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, ready = http("GET", base_url + "/ready")
        assert status == 503 and ready["status"].startswith("draining")
        assert http("GET", base_url + "/health") == (200, {"status": "alive"})
        assert _health(channel) == {
            "": NOT_SERVING, INFERENCE_SERVICE: NOT_SERVING, LIVENESS_SERVICE: SERVING,
            ADMIN_SERVICE: SERVING,
        }  # fmt: skip
        status, refused = _completion(base_url)
        assert status == 503 and refused["error"]["type"] == "service_unavailable_error"
        assert "shutting down" in refused["error"]["message"]

        reader.join(timeout=120)
        assert events[-1] == b"data: [DONE]\n"
        chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"  # it ran to the end
        assert chunks[-1]["usage"]["completion_tokens"] == 400
        assert process.wait(timeout=60) == 0, process.stdout.read()[-3000:]
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
