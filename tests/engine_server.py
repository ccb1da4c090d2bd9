"""A real engine gRPC server in this process, on a loopback port picked by the OS, or a
real `loraplex engine serve` child process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from engine.config import EngineConfig
from engine.server.app import EngineParts, build_engine, serve
from loraplex.v1 import engine_admin_pb2_grpc, inference_pb2, inference_pb2_grpc


@dataclass
class RunningEngine:
    parts: EngineParts
    port: int
    channel: grpc.Channel

    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel)

    @property
    def admin(self) -> engine_admin_pb2_grpc.EngineAdminStub:
        return engine_admin_pb2_grpc.EngineAdminStub(self.channel)

    def generate(self, request: inference_pb2.GenerateRequest, metadata=()) -> GenerateResult:
        return collect(self.inference.Generate(request, metadata=metadata))


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int
    num_messages: int


def collect(stream) -> GenerateResult:
    text, ids, n, last = [], [], 0, None
    for response in stream:
        text.append(response.text)
        ids.extend(response.token_ids)
        n += 1
        last = response
    return GenerateResult(
        "".join(text),
        ids,
        last.finish_reason,
        last.usage.prompt_tokens,
        last.usage.completion_tokens,
        n,
    )


@contextmanager
def running_engine(
    config: EngineConfig, parts: EngineParts | None = None
) -> Iterator[RunningEngine]:
    """Builds the engine (unless `parts` is given), serves it on a background event
    loop, yields a client side."""
    parts = parts or build_engine(config)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    ports: list[int] = []

    def on_ready(port: int) -> None:
        ports.append(port)
        ready.set()

    task_box: list[asyncio.Task] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        task = loop.create_task(serve(config, on_ready=on_ready, parts=parts))
        task_box.append(task)
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("the engine server did not start within 60 s")
    channel = grpc.insecure_channel(f"127.0.0.1:{ports[0]}")
    try:
        yield RunningEngine(parts, ports[0], channel)
    finally:
        channel.close()
        loop.call_soon_threadsafe(task_box[0].cancel)
        thread.join(30)


def start_engine_process(model_path: Path, port: int, *flags: str) -> subprocess.Popen:
    """`loraplex engine serve` on the CPU as a child process on `port` (text stdout, with
    stderr), returned once it says it is ready. The caller ends it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loraplex.cli", "engine", "serve", "--model", str(model_path),
         "--device", "cpu", "--port", str(port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        if "engine ready" in line:
            break
    return process
