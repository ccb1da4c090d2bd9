"""The benchmark's gRPC client: one asyncio loop per client process streaming many
`Inference.Generate` calls at once, recording when each message arrives.

`run_partition` is what a client process runs. Times are `time.monotonic()` (one
system-wide clock on Linux, so the parent can merge several processes' records).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import grpc

from loraplex.v1 import inference_pb2, inference_pb2_grpc

STREAMS_PER_CHANNEL = 100  # separate HTTP/2 connections so no stream limit queues calls
# A request still streaming after this long means the engine is stuck: fail, do not hang.
REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RequestSpec:
    index: int
    adapter: str  # "" = base model
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    offset_s: float  # send at start_at + offset_s


@dataclass
class RequestRecord:
    index: int
    adapter: str
    send: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # one per message with tokens
    tokens: list[int] = field(default_factory=list)  # len(token_ids) of those messages
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens)


@dataclass
class PartitionResult:
    records: list[RequestRecord]
    cpu_s: float  # this client process's CPU time over the run
    wall_s: float


def run_partition(target: str, specs: list[RequestSpec], start_at: float) -> PartitionResult:
    """Send every spec at `start_at + offset_s` and stream it to the end."""
    cpu0, wall0 = time.process_time(), time.monotonic()
    records = asyncio.run(_run(target, specs, start_at))
    return PartitionResult(records, time.process_time() - cpu0, time.monotonic() - wall0)


def ping() -> None:
    """A no-op: warms a client process (imports done) before anything is timed."""


async def _run(target: str, specs: list[RequestSpec], start_at: float) -> list[RequestRecord]:
    num_channels = max(1, math.ceil(len(specs) / STREAMS_PER_CHANNEL))
    # A local subchannel pool gives each channel its own TCP connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(num_channels)]
    try:
        stubs = [inference_pb2_grpc.InferenceStub(c) for c in channels]
        calls = [_one(stubs[i % num_channels], spec, start_at) for i, spec in enumerate(specs)]
        return list(await asyncio.gather(*calls))
    finally:
        for channel in channels:
            await channel.close()


async def _one(
    stub: inference_pb2_grpc.InferenceStub, spec: RequestSpec, start_at: float
) -> RequestRecord:
    request = inference_pb2.GenerateRequest(
        request_id=f"bench-{spec.index}",
        adapter=spec.adapter,
        token_ids=inference_pb2.TokenIds(ids=spec.prompt_ids),
        sampling=inference_pb2.SamplingParams(
            max_new_tokens=spec.max_new_tokens, temperature=0.0, ignore_eos=True
        ),
    )
    record = RequestRecord(spec.index, spec.adapter)
    delay = start_at + spec.offset_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    record.send = time.monotonic()
    try:
        async for response in stub.Generate(request, timeout=REQUEST_TIMEOUT_S):
            now = time.monotonic()
            if response.token_ids:
                record.arrivals.append(now)
                record.tokens.append(len(response.token_ids))
                record.output_ids.extend(response.token_ids)
            if response.finish_reason:
                record.finish_reason = inference_pb2.FinishReason.Name(response.finish_reason)
                record.error = response.error
    except grpc.RpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"
    return record
