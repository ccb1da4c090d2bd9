"""Numbers of one workload: what the client saw (tokens/s, TTFT, inter-token latency),
the engine's own view (its Prometheus counters, differenced over the run) and the bytes
floor of a decode step.

Inter-token latency: a message carrying k tokens after a gap g contributes k samples of
g / k (the engine may batch several tokens into one message; each still waited).
"""

from __future__ import annotations

import statistics
from typing import Any

from latency import percentiles
from prometheus_client.parser import text_string_to_metric_families
from serving_client import RequestRecord
from serving_spec import HBM_BYTES_PER_S, Preset
from serving_workloads import RunResult, Workload

P = "loraplex_engine_"
STEP_KINDS = ("prefill", "decode", "mixed")
# A client process busier than this share of one core may be what limits the numbers.
CLIENT_BOUND_CPU_SHARE = 0.8


def client_view(records: list[RequestRecord]) -> dict[str, Any]:
    """Throughput and latencies of one run (all its requests)."""
    first_send = min(r.send for r in records)
    last = max(r.arrivals[-1] for r in records)
    duration = last - first_send
    tokens = sum(r.num_tokens for r in records)
    itl: list[float] = []
    for r in records:
        for prev, now, k in zip(r.arrivals, r.arrivals[1:], r.tokens[1:], strict=False):
            itl += [(now - prev) / k] * k
    messages = sum(len(r.tokens) for r in records)
    return {
        "requests": len(records),
        "output_tokens": tokens,
        "duration_s": duration,
        "output_tokens_per_s": tokens / duration,
        "requests_per_s": len(records) / duration,
        "ttft_ms": percentiles([r.arrivals[0] - r.send for r in records], 1e3),
        "itl_ms": percentiles(itl, 1e3),
        "e2e_ms": percentiles([r.arrivals[-1] - r.send for r in records], 1e3),
        "tokens_per_message": tokens / messages,
    }


def summarize_runs(results: list[RunResult]) -> dict[str, Any]:
    """One run: its client view. Several (B1): medians of tokens/s and requests/s,
    latency percentiles over every request of every run."""
    views = [client_view(r.records) for r in results]
    out = client_view([rec for r in results for rec in r.records]) if len(views) > 1 else views[0]
    if len(views) > 1:
        for key in ("output_tokens_per_s", "requests_per_s", "duration_s"):
            out[key] = statistics.median(v[key] for v in views)
        out["per_run_output_tokens_per_s"] = [v["output_tokens_per_s"] for v in views]
    pairs = [pair for r in results for pair in zip(r.client_cpu_s, r.client_wall_s, strict=True)]
    share = max(cpu / wall for cpu, wall in pairs if wall)
    out["client"] = {
        "processes": max(len(r.client_cpu_s) for r in results),
        "cpu_s": sum(cpu for cpu, _ in pairs),
        "max_cpu_share_of_one_core": share,
        "client_bound": share >= CLIENT_BOUND_CPU_SHARE,
    }
    return out


def scrape_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """Difference of one sample, summed over the label sets that contain `labels`."""
    total = 0.0
    for (sample, sample_labels), value in after.items():
        if sample == name and set(labels.items()) <= set(sample_labels):
            total += value - before.get((sample, sample_labels), 0.0)
    return total


def engine_view(before_text: str, after_text: str) -> dict[str, Any]:
    before, after = scrape_values(before_text), scrape_values(after_text)

    def mean(name: str, scale: float = 1.0, **labels: str) -> float | None:
        count = _delta(before, after, name + "_count", **labels)
        return _delta(before, after, name + "_sum", **labels) / count * scale if count else None

    steps = {
        kind: {
            "count": int(_delta(before, after, P + "step_duration_seconds_count", kind=kind)),
            "mean_ms": mean(P + "step_duration_seconds", 1e3, kind=kind),
        }
        for kind in STEP_KINDS
    }
    return {
        "steps": steps,
        "mean_batch_seqs": mean(P + "batch_size_seqs"),
        "mean_batch_tokens": mean(P + "batch_size_tokens"),
        "step_phase_mean_ms": {
            phase: mean(P + "step_phase_seconds", 1e3, phase=phase)
            for phase in ("schedule", "launch", "wait", "collect", "stream")
        },
        "adapter_slot_loads": int(_delta(before, after, P + "adapter_slot_loads_total")),
        "preemptions": int(_delta(before, after, P + "preemptions_total")),
        "generation_tokens": int(_delta(before, after, P + "generation_tokens_total")),
    }


def decode_floor(
    preset: Preset, workload: Workload, view: dict[str, Any], engine: dict[str, Any], max_loras: int
) -> dict[str, Any]:
    """Bytes one decode step must read at least, as time at HBM_BYTES_PER_S, against the
    measured mean decode step. The batch is estimated from the counters: every token but
    each request's first comes from a one-token (decode) row of a decode or mixed step."""
    spec = preset.model
    steps = engine["steps"]
    decode_like = steps["decode"]["count"] + steps["mixed"]["count"]
    rows = view["output_tokens"] - view["requests"]
    batch = rows / decode_like if decode_like else 0.0
    context = preset.prompt_len + preset.max_new_tokens / 2  # mean over the decode steps
    n = workload.num_adapters
    if n == 0:
        distinct = 0.0
    elif workload.adapters_per_request:
        distinct = min(batch, n)
    else:  # requests over n adapters at random: expected distinct among `batch` of them
        distinct = n * (1 - (1 - 1 / n) ** batch)
    distinct = min(distinct, max_loras)
    weights = spec.weight_bytes_without_embedding()
    kv = batch * context * spec.kv_bytes_per_token()
    adapters = distinct * spec.adapter_bytes(preset.lora_rank)
    floor_ms = (weights + kv + adapters) / HBM_BYTES_PER_S * 1e3
    measured = steps["decode"]["mean_ms"]
    return {
        "mean_decode_batch_seqs": batch,
        "mean_context_tokens": context,
        "distinct_adapters_per_step": distinct,
        "weight_bytes": weights,
        "kv_bytes": kv,
        "adapter_bytes": adapters,
        "floor_ms": floor_ms,
        "decode_step_ms": measured,
        "x_floor": measured / floor_ms if measured is not None else None,
    }
