"""Numbers and verdicts of a soak: throughput and latency percentiles of the completed
requests, whether resident memory stayed flat, and the markdown page of the result."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from bench.latency import percentiles
from bench.soak_load import Record

# Resident memory is flat when, after the warm-up, it grows by at most this much
# (allocator arenas and caches settle; a leak per request grows without bound).
RSS_FLAT_FRACTION = 0.05
RSS_FLAT_MIN_BYTES = 64 * 2**20


def client_view(records: list[Record], wall_s: float) -> dict[str, Any]:
    done = [r for r in records if r.complete]
    failed = Counter(r.error or r.finish for r in records if not r.complete)
    tokens = sum(r.tokens for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "incomplete": len(records) - len(done),
        "failures": dict(failed.most_common(5)),
        "wall_s": wall_s,
        "requests_per_s": len(done) / wall_s if wall_s else 0.0,
        "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "e2e_ms": percentiles([r.last - r.send for r in done], 1e3),
        "ttft_ms": percentiles([r.first - r.send for r in done], 1e3),
        "by_tenant": dict(Counter(r.tenant for r in done)),
    }


def rss_trend(samples: list[tuple[float, int]], warmup_s: float) -> dict[str, Any]:
    """Growth of resident memory from just after the warm-up to the end of the run."""
    start = samples[0][0]
    settled = [(t, b) for t, b in samples if t - start >= warmup_s] or samples
    head = statistics.median(b for _, b in settled[:3])
    tail = statistics.median(b for _, b in settled[-3:])
    allowed = max(RSS_FLAT_FRACTION * head, RSS_FLAT_MIN_BYTES)
    return {
        "samples": len(samples),
        "after_warmup_mib": head / 2**20,
        "end_mib": tail / 2**20,
        "max_mib": max(b for _, b in samples) / 2**20,
        "growth_mib": (tail - head) / 2**20,
        "allowed_growth_mib": allowed / 2**20,
        "flat": tail - head <= allowed,
        "series_mib": [[round(t - start, 1), round(b / 2**20, 1)] for t, b in samples],
    }


def _ms(view: dict[str, Any], key: str) -> str:
    p = view[key]
    if p["p50"] is None:
        return "-"
    return f"{p['p50']:.0f} / {p['p90']:.0f} / {p['p99']:.0f}"


def markdown(result: dict[str, Any]) -> str:
    c, rss, checks = result["client"], result["rss"], result["checks"]
    cfg, machine = result["config"], result["machine"]
    every = max(1, len(rss["series_mib"]) // 12)
    series = ", ".join(f"{t:.0f}s {m:.0f}" for t, m in rss["series_mib"][::every])
    lines = [
        f"# Soak on {machine.get('gpu') or 'CPU'}: {cfg['streams']} streams over "
        f"{cfg['adapters']} adapters of {cfg['tenants']} tenants",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Commit `{result['commit']}`{' (uncommitted changes)' if result['dirty'] else ''}; "
        f"{machine['cpu_count']} CPU cores ({machine['cpu']}), {machine['platform']}, "
        f"Python {machine['python']}, torch {machine['versions'].get('torch')}. "
        f"Load average before/after: {result['load_before']} / {result['load_after']} "
        "(the machine is shared: other processes ran beside the soak).",
        "",
        f"Model {cfg['model']} on {cfg['device']}; every request: a prompt of "
        f"{cfg['prompt_lens'][0]}-{cfg['prompt_lens'][1]} random token ids, "
        f"max_new_tokens {cfg['max_new_tokens']} with ignore_eos, greedy. Engine: "
        f"--max-loras {cfg['max_loras']} (fewer slots than adapters: slots churn), "
        f"--max-cpu-loras {cfg['max_cpu_loras']}, --max-requests-per-tenant "
        f"{cfg['per_tenant_cap']} (= each tenant's streams, so a leaked in-flight count "
        "would refuse a request).",
        "",
        "| requests | completed | req/s | output tok/s | e2e ms p50/p90/p99 "
        "| TTFT ms p50/p90/p99 |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {c['requests']} | {c['completed']} | {c['requests_per_s']:.2f} "
        f"| {c['output_tokens_per_s']:.1f} | {_ms(c, 'e2e_ms')} | {_ms(c, 'ttft_ms')} |",
        "",
        "## Checks",
        "",
        "| check | result |",
        "|---|---|",
    ]
    for name, check in checks.items():
        lines.append(f"| {name} | {'PASS' if check['ok'] else 'FAIL'}: {check['detail']} |")
    lines += [
        "",
        f"Resident memory of the engine (MiB, every {every * cfg['rss_interval_s']:.0f} s): "
        f"{series}; peak {rss['max_mib']:.0f} MiB. Flat means: from the end of the warm-up "
        "to the end of the run it grew by at most "
        f"{RSS_FLAT_FRACTION:.0%} (at least {RSS_FLAT_MIN_BYTES // 2**20} MiB allowed); "
        "in between it may rise and fall as adapter images and allocator arenas come and go.",
        "",
        f"Engine counters over the soak: {result['engine_counters']}.",
        "",
    ]
    return "\n".join(lines)
