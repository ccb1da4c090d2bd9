"""The serving benchmark's workloads: which requests each one sends and when, and a
runner that spreads them over warm client processes and checks every answer.

Names: W1 / W1-base (a burst of requests, each its own adapter / no adapter), W2 /
W2-base (a large burst over all adapters / the base model), B1 / B1-base (one request
alone, repeated), W3@<rate> (Poisson arrivals over all adapters at that rate).
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from serving_client import PartitionResult, RequestRecord, RequestSpec, ping, run_partition
from serving_engine import BenchError
from serving_spec import Preset, adapter_ids

GROUPS = ("W1", "W2", "B1", "W3")
_LEAD_S = 0.5  # between handing partitions to the client processes and the first send


@dataclass(frozen=True)
class Workload:
    name: str
    runs: tuple[tuple[RequestSpec, ...], ...]  # B1 runs several times; the others once
    base_of: str  # the workload this is the base-model twin of ("" if none)
    adapters_per_request: bool  # every request its own adapter (W1): distinct = batch size
    num_adapters: int  # distinct adapters the workload uses (0 = base model)


def expand(selection: str, preset: Preset) -> list[str]:
    """`W1,W2,B1,W3` (a group: the adapter workload and its base twin; W3: every rate)
    or single ones (`W2-lora`, `W2-base`, `W3@8`) -> workload names (`W2`, `W2-base`)."""
    names: list[str] = []
    for item in filter(None, (s.strip() for s in selection.split(","))):
        if item == "W3":
            names += [f"W3@{rate:g}" for rate in preset.w3_rates]
        elif item in GROUPS:
            names += [item, f"{item}-base"]
        elif item.removesuffix("-lora") in GROUPS:
            names.append(item.removesuffix("-lora"))
        elif item.removesuffix("-base") in GROUPS or item.startswith("W3@"):
            names.append(item)
        else:
            raise BenchError(
                f"unknown workload {item!r}; use {', '.join(GROUPS)}, or one half of a "
                "group (W2-lora: adapters only, W2-base: base model only), or W3@<rate>"
            )
    return list(dict.fromkeys(names))


def build(name: str, preset: Preset, seed: int) -> Workload:
    """The requests of workload `name`, the same for the same preset and seed."""
    ids = adapter_ids(preset.num_adapters)
    base = name.endswith("-base")
    group = name.removesuffix("-base")
    # Seeded by group: a workload and its base twin send the same prompts.
    rng = random.Random(f"{seed}:{group}")
    if group == "W1":
        adapters = ["" if base else ids[i % len(ids)] for i in range(preset.w1_requests)]
        specs = _specs(preset, rng, adapters, [0.0] * len(adapters))
        return Workload(name, (specs,), "W1" if base else "", not base, len(set(adapters) - {""}))
    if group == "W2":
        adapters = [ids[i % len(ids)] for i in range(preset.w2_requests)]
        rng.shuffle(adapters)
        if base:
            adapters = [""] * len(adapters)
        specs = _specs(preset, rng, adapters, [0.0] * len(adapters))
        return Workload(name, (specs,), "W2" if base else "", False, len(set(adapters) - {""}))
    if group == "B1":
        runs = tuple(
            _specs(preset, rng, ["" if base else ids[i % len(ids)]], [0.0])
            for i in range(preset.b1_repeats)
        )
        return Workload(name, runs, "B1" if base else "", True, 0 if base else 1)
    if name.startswith("W3@"):
        rate = float(name.removeprefix("W3@"))
        offsets: list[float] = []
        t = rng.expovariate(rate)
        while t < preset.w3_duration_s:
            offsets.append(t)
            t += rng.expovariate(rate)
        adapters = [rng.choice(ids) for _ in offsets]
        specs = _specs(preset, rng, adapters, offsets)
        return Workload(name, (specs,), "", False, len(set(adapters)))
    raise BenchError(f"unknown workload {name!r}")


def _specs(
    preset: Preset, rng: random.Random, adapters: list[str], offsets: list[float]
) -> tuple[RequestSpec, ...]:
    model = preset.model
    specials = {model.bos_token_id, model.eos_token_id}
    specs = []
    for index, (adapter, offset) in enumerate(zip(adapters, offsets, strict=True)):
        prompt = []
        while len(prompt) < preset.prompt_len:
            token = rng.randrange(model.vocab_size)
            if token not in specials:
                prompt.append(token)
        specs.append(RequestSpec(index, adapter, tuple(prompt), preset.max_new_tokens, offset))
    return tuple(specs)


@dataclass
class RunResult:
    records: list[RequestRecord]
    client_cpu_s: list[float]  # per client process
    client_wall_s: list[float]


class ClientPool:
    """`num_procs` spawned client processes, warmed once and reused by every run."""

    def __init__(self, num_procs: int) -> None:
        import multiprocessing

        self.num_procs = num_procs
        self._pool = ProcessPoolExecutor(num_procs, mp_context=multiprocessing.get_context("spawn"))
        list(self._pool.map(_ping_one, range(num_procs)))

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def run(self, target: str, specs: tuple[RequestSpec, ...]) -> RunResult:
        """Send `specs` (round-robin over the processes) and check every answer."""
        parts = [list(specs[i :: self.num_procs]) for i in range(self.num_procs)]
        parts = [p for p in parts if p]
        start_at = time.monotonic() + _LEAD_S
        futures = [self._pool.submit(run_partition, target, p, start_at) for p in parts]
        results: list[PartitionResult] = [f.result() for f in futures]
        records = sorted((r for res in results for r in res.records), key=lambda r: r.index)
        check(records, specs)
        return RunResult(records, [r.cpu_s for r in results], [r.wall_s for r in results])


def _ping_one(_: int) -> None:
    ping()
    time.sleep(0.2)  # hold this worker so the next ping lands on another process


def check(records: list[RequestRecord], specs: tuple[RequestSpec, ...]) -> None:
    """Raise BenchError unless every request finished by length with exactly its
    max_new_tokens tokens."""
    bad = []
    for record, spec in zip(records, specs, strict=True):
        if record.error:
            bad.append(f"request {spec.index} (adapter {spec.adapter!r}): {record.error}")
        elif record.num_tokens != spec.max_new_tokens:
            bad.append(
                f"request {spec.index} (adapter {spec.adapter!r}) returned "
                f"{record.num_tokens} tokens, expected {spec.max_new_tokens} "
                f"(finish {record.finish_reason or 'none'})"
            )
        elif record.finish_reason != "FINISH_REASON_LENGTH":
            bad.append(f"request {spec.index} finished with {record.finish_reason}")
    if bad:
        raise BenchError(
            f"{len(bad)} of {len(specs)} requests failed; first: " + "; ".join(bad[:3])
        )
