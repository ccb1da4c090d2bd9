"""`--frontend-process on`: the public port is served by a process of its own, and a
client cannot tell: the same tokens, refusals, cancels, admin rules and health as from
the engine's own server. Real processes, real gRPC on loopback, a real tiny Llama and a
real PEFT adapter."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.config import EngineConfig
from engine.server.app import build_engine, serve
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import inference_pb2
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import collect, running_engine, start_engine_process
from tests.ports import free_port

ADMIN_TOKEN = "frontend-test-admin-token-0123456789"


@pytest.fixture(scope="module")
def adapter_root(tiny_llama31_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("frontend-adapters")
    make_peft_adapter(
        tiny_llama31_path, root / "a", r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=3
    )
    return root


def config_for(model_path, adapter_root, frontend: str = "on", **overrides) -> EngineConfig:
    values = dict(
        model_path=model_path,
        device="cpu",
        port=0,
        kv_cache_tokens=2048,
        max_loras=2,
        max_lora_rank=8,
        adapter_roots=(adapter_root,),
        frontend_process=frontend,
    )
    values.update(overrides)
    return EngineConfig(**values)


def _request(max_new_tokens: int, adapter: str = "", **fields) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        adapter=adapter,
        token_ids=inference_pb2.TokenIds(ids=[5, 6, 7, 8]),
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
        **fields,
    )


def _load(running, adapter_root, metadata=()) -> None:
    running.admin.LoadAdapter(
        admin_pb.LoadAdapterRequest(adapter_id="a", path=str(adapter_root / "a")),
        metadata=metadata,
    )


@pytest.fixture(scope="module")
def frontend_engine(tiny_llama31_path, adapter_root):
    with running_engine(config_for(tiny_llama31_path, adapter_root)) as running:
        _load(running, adapter_root)  # through the front end: EngineAdmin is forwarded
        yield running


def test_streams_the_same_outputs_as_the_engines_own_server(
    frontend_engine, tiny_llama31_path, adapter_root
):
    requests = [_request(12), _request(12, "a"), _request(9, "a", request_id="mine")] * 2
    results: list = [None] * len(requests)

    def run(index: int) -> None:
        results[index] = list(frontend_engine.inference.Generate(requests[index]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with running_engine(config_for(tiny_llama31_path, adapter_root, frontend="off")) as direct:
        _load(direct, adapter_root)
        expected = [collect(direct.inference.Generate(r)) for r in requests[:3]]
    for index, responses in enumerate(results):
        got = collect(iter(responses))
        want = expected[index % 3]
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids, want.text, want.finish_reason
        )  # fmt: skip
        assert (got.prompt_tokens, got.completion_tokens) == (4, len(want.token_ids))
        assert {r.adapter_id for r in responses} == {requests[index].adapter}
    assert {r.request_id for r in results[2]} == {"mine"}
    assert expected[0].token_ids != expected[1].token_ids  # the adapter took part


def test_refusals_keep_their_status_and_sentence_while_other_streams_go_on(frontend_engine):
    long_call: list = []
    reader = threading.Thread(
        target=lambda: long_call.append(collect(frontend_engine.inference.Generate(_request(150))))
    )
    reader.start()
    with pytest.raises(grpc.RpcError) as missing:
        list(frontend_engine.inference.Generate(_request(3, "no-such-adapter")))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'no-such-adapter' is not loaded on this engine" in missing.value.details()
    bad = _request(3)
    bad.sampling.temperature = -1
    with pytest.raises(grpc.RpcError) as invalid:
        list(frontend_engine.inference.Generate(bad))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature is -1.0" in invalid.value.details()
    reader.join(60)
    assert long_call[0].completion_tokens == 150
    assert long_call[0].finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_a_caller_that_goes_away_frees_its_engine_request(frontend_engine):
    stream = frontend_engine.inference.Generate(_request(1000, "a"))
    next(stream)
    assert frontend_engine.parts.engine.snapshot().num_running == 1
    stream.cancel()
    deadline = time.monotonic() + 10
    while frontend_engine.parts.engine.snapshot().num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert frontend_engine.parts.engine.snapshot().num_running == 0
    assert collect(frontend_engine.inference.Generate(_request(3))).completion_tokens == 3


def test_engine_admin_on_the_public_port_needs_the_admin_token(tiny_llama31_path, adapter_root):
    config = config_for(tiny_llama31_path, adapter_root, admin_token=ADMIN_TOKEN)
    with running_engine(config) as running:
        with pytest.raises(grpc.RpcError) as refused:
            running.admin.GetEngineInfo(admin_pb.GetEngineInfoRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing credentials" in refused.value.details()
        admin = [("authorization", f"Bearer {ADMIN_TOKEN}")]
        info = running.admin.GetEngineInfo(admin_pb.GetEngineInfoRequest(), metadata=admin)
        assert info.model_name and info.device == "cpu"
        # The engine's own refusals come back unchanged through the forwarder.
        with pytest.raises(grpc.RpcError) as outside:
            running.admin.LoadAdapter(
                admin_pb.LoadAdapterRequest(adapter_id="x", path="/etc"), metadata=admin
            )
        assert outside.value.code() == grpc.StatusCode.PERMISSION_DENIED
        _load(running, adapter_root, metadata=admin)
        assert collect(running.inference.Generate(_request(3, "a"))).completion_tokens == 3


def test_health_is_the_engines_and_the_port_closes_with_the_engine(tiny_llama31_path, adapter_root):
    with running_engine(config_for(tiny_llama31_path, adapter_root)) as running:
        health = health_pb2_grpc.HealthStub(running.channel)
        for service in ("", "loraplex.v1.Inference", "loraplex.v1.EngineAdmin", "liveness"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        port = running.port
    with socket.socket() as probe:  # the front-end process has gone with the engine
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_taken_public_port_fails_the_start_with_a_sentence(tiny_llama31_path, adapter_root):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = config_for(tiny_llama31_path, adapter_root, port=taken.getsockname()[1])
        with pytest.raises(OSError, match="front-end process could not start: cannot bind"):
            asyncio.run(serve(config, parts=build_engine(config)))


def test_the_front_end_imports_no_torch():
    # It starts in well under a second and holds no GPU context.
    code = "import sys, engine.server.frontend; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live child processes of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append((int(entry.name), cmdline))
    return found


def test_an_engine_whose_front_end_dies_exits_with_a_sentence(tiny_llama31_path):
    port = free_port()
    process = start_engine_process(
        tiny_llama31_path, port, "--kv-cache-tokens", "1024", "--frontend-process", "on"
    )
    try:
        assert process.stdout is not None
        (frontend,) = [
            pid for pid, cmd in _children(process.pid) if "engine.server.frontend" in cmd
        ]
        os.kill(frontend, signal.SIGKILL)
        assert process.wait(timeout=30) == 2
        output = process.stdout.read()
        assert f"the front-end process serving port {port} exited with code -9" in output
        assert "restart this engine" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
