"""The soak's moving parts, shared by `bench/soak.py` and its mini version in the tests:
set up tenants (keys) and adapters on a running engine over EngineAdmin, keep a number
of Generate streams busy for a while (each stream on one adapter, every request asking
for a full `max_new_tokens` with ignore_eos), sample the engine's resident memory, and
read back whether everything returned to idle.

Plain threads and blocking gRPC stubs: a stream per thread keeps the client simple and
its cost small next to the engine's.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loraplex.keys import hash_secret, new_key
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import engine_admin_pb2_grpc, inference_pb2, inference_pb2_grpc

REQUEST_TIMEOUT_S = 120.0  # a stream still open after this long means the engine is stuck


@dataclass(frozen=True)
class SoakPlan:
    streams: int
    max_new_tokens: int
    prompt_lens: tuple[int, int]  # prompt token ids drawn uniformly in [lo, hi]
    duration_s: float
    vocab_size: int
    seed: int = 0


@dataclass
class Fleet:
    """What `set_up_fleet` put on the engine: adapter alias -> tenant, tenant -> key."""

    adapters: dict[str, str]
    keys: dict[str, str]

    def metadata(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[tenant]}"),)


@dataclass
class Record:
    adapter: str
    tenant: str
    send: float
    first: float = 0.0  # first token
    last: float = 0.0  # final message
    tokens: int = 0
    finish: str = ""
    error: str = ""

    @property
    def complete(self) -> bool:
        return not self.error and self.finish == "FINISH_REASON_LENGTH"


@dataclass
class SoakResult:
    records: list[Record] = field(default_factory=list)
    wall_s: float = 0.0


def set_up_fleet(
    admin: engine_admin_pb2_grpc.EngineAdminStub,
    admin_token: str,
    folders: list[Path],
    tenants: list[str],
) -> Fleet:
    """One API key per tenant (SyncApiKeys) and adapter i on folder i, owned by tenant
    i % len(tenants) and named "<tenant>/a<i>"."""
    metadata = (("authorization", f"Bearer {admin_token}"),)
    keys, entries = {}, []
    for tenant in tenants:
        key_id, secret, key = new_key()
        keys[tenant] = key
        entries.append(
            admin_pb.ApiKeyEntry(key_id=key_id, secret_hash=hash_secret(secret), tenant=tenant)
        )
    admin.SyncApiKeys(admin_pb.SyncApiKeysRequest(keys=entries, generation=1), metadata=metadata)
    adapters = {}
    for index, folder in enumerate(folders):
        tenant = tenants[index % len(tenants)]
        alias = f"{tenant}/a{index}"
        admin.LoadAdapter(
            admin_pb.LoadAdapterRequest(
                adapter_id=f"{alias}@1", path=str(folder), tenant=tenant, aliases=[alias]
            ),
            metadata=metadata,
            timeout=60,
        )
        adapters[alias] = tenant
    return Fleet(adapters, keys)


def _one(
    stub: inference_pb2_grpc.InferenceStub,
    fleet: Fleet,
    adapter: str,
    plan: SoakPlan,
    rng: random.Random,
) -> Record:
    length = rng.randint(*plan.prompt_lens)
    request = inference_pb2.GenerateRequest(
        adapter=adapter,
        token_ids=inference_pb2.TokenIds(
            ids=[rng.randrange(3, plan.vocab_size) for _ in range(length)]
        ),
        sampling=inference_pb2.SamplingParams(
            max_new_tokens=plan.max_new_tokens, temperature=0.0, ignore_eos=True
        ),
    )
    tenant = fleet.adapters[adapter]
    record = Record(adapter, tenant, time.monotonic())
    try:
        stream = stub.Generate(request, metadata=fleet.metadata(tenant), timeout=REQUEST_TIMEOUT_S)
        for response in stream:
            if response.token_ids and not record.tokens:
                record.first = time.monotonic()
            record.tokens += len(response.token_ids)
            if response.finish_reason:
                record.finish = inference_pb2.FinishReason.Name(response.finish_reason)
                record.error = response.error
        record.last = time.monotonic()
        if record.tokens != plan.max_new_tokens and not record.error:
            record.error = f"got {record.tokens} of {plan.max_new_tokens} tokens"
    except grpc.RpcError as exc:
        record.last = time.monotonic()
        record.error = f"{exc.code().name}: {exc.details()}"
    return record


def run_soak(target: str, fleet: Fleet, plan: SoakPlan) -> SoakResult:
    """`plan.streams` streams, stream i on adapter i % len(adapters), each sending its
    next request as soon as the previous one ends, until `plan.duration_s` is over."""
    adapters = sorted(fleet.adapters)
    deadline = time.monotonic() + plan.duration_s
    channel = grpc.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    result = SoakResult()
    lock = threading.Lock()

    def stream(index: int) -> None:
        rng = random.Random(plan.seed * 1_000_003 + index)
        adapter = adapters[index % len(adapters)]
        while time.monotonic() < deadline:
            record = _one(stub, fleet, adapter, plan, rng)
            with lock:
                result.records.append(record)

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(plan.streams) as pool:
            for future in [pool.submit(stream, i) for i in range(plan.streams)]:
                future.result()
    finally:
        channel.close()
    result.wall_s = time.monotonic() - started
    return result


def burst(target: str, fleet: Fleet, per_tenant: int, plan: SoakPlan) -> list[Record]:
    """`per_tenant` requests at once for every tenant. With the engine's per-tenant cap
    set to exactly `per_tenant`, all are admitted only if no in-flight count leaked."""
    by_tenant: dict[str, list[str]] = {}
    for adapter, tenant in sorted(fleet.adapters.items()):
        by_tenant.setdefault(tenant, []).append(adapter)
    jobs = [names[i % len(names)] for names in by_tenant.values() for i in range(per_tenant)]
    channel = grpc.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(
                pool.map(
                    lambda job: _one(stub, fleet, job[1], plan, random.Random(job[0])),
                    enumerate(jobs),
                )
            )
    finally:
        channel.close()


def idle_state(
    admin: engine_admin_pb2_grpc.EngineAdminStub, admin_token: str, metrics_text: str
) -> dict[str, int]:
    """The counts that must be back at rest once no request is in flight."""
    metadata = (("authorization", f"Bearer {admin_token}"),)
    info = admin.GetEngineInfo(admin_pb.GetEngineInfoRequest(), metadata=metadata, timeout=10)
    listed = admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=metadata, timeout=10)
    gauges = {
        line.split()[0]: float(line.split()[1])
        for line in metrics_text.splitlines()
        if line.startswith("loraplex_engine_") and len(line.split()) == 2
    }
    return {
        "running_requests": info.running_requests,
        "waiting_requests": info.waiting_requests,
        "kv_blocks_used": info.kv_blocks_total - info.kv_blocks_free,
        "adapter_requests_in_flight": sum(a.requests_in_flight for a in listed.adapters),
        "adapters_evicting": sum(1 for a in listed.adapters if a.evicting),
        "adapter_slots_pinned": int(gauges.get("loraplex_engine_adapter_slots_in_use", -1)),
    }


def is_idle(state: dict[str, int]) -> bool:
    return all(value == 0 for value in state.values())


class RssSampler:
    """Samples a process's resident set size every `interval_s` seconds (Linux /proc)."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (monotonic seconds, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()

    def sample(self) -> None:
        status = Path(f"/proc/{self.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        self.samples.append((time.monotonic(), kib * 1024))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
