"""Soak: a real engine process on loopback, many Generate streams over many adapters of
several tenants for minutes. Passes when every request gets its full token count, the
engine returns to idle afterwards (no request running or waiting, every KV block free,
no adapter or slot held, and each tenant can again fill exactly its in-flight cap), and
the engine's resident memory stays flat.

    .venv/bin/python bench/soak.py --duration-s 180 --out bench/results/soak_cpu

Writes <out>.json (every number, the RSS series) and <out>.md; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.serving_engine import BenchError, EngineProcess  # noqa: E402
from bench.serving_report import git_commit, machine_info  # noqa: E402
from bench.soak_load import (  # noqa: E402
    RssSampler,
    SoakPlan,
    burst,
    idle_state,
    is_idle,
    run_soak,
    set_up_fleet,
)
from bench.soak_report import client_view, markdown, rss_trend  # noqa: E402
from engine.model.config import load_model_config  # noqa: E402
from engine.model.default_model import resolve_model_path  # noqa: E402
from loraplex.environment import cache_dir  # noqa: E402
from loraplex.v1 import engine_admin_pb2_grpc  # noqa: E402
from tests.adapter_factory import write_random_adapter  # noqa: E402

COUNTERS = ("requests_finished", "requests_refused", "adapter_slot_loads", "preemptions")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="a model folder or 'default'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--warmup-s", type=float, default=30.0, help="RSS settles meanwhile")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-lens", default="8,48", help="min,max prompt token ids")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-cpu-loras", type=int, default=8)
    parser.add_argument("--kv-cache-tokens", type=int, default=16384)
    parser.add_argument("--rss-interval-s", type=float, default=5.0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/loraplex-soak"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak_cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _adapters(model_dir: Path, root: Path, count: int, rank: int) -> list[Path]:
    config = load_model_config(model_dir)
    folders = []
    for index in range(count):
        folder = root / f"a{index}"
        if not (folder / "adapter_model.safetensors").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_random_adapter(folder, config, rank, seed=index)
        folders.append(folder)
    return folders


def _counters(metrics_text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        name = family.name.removeprefix("loraplex_engine_")
        if name in COUNTERS:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    label = ",".join(
                        f"{v}" for k, v in sorted(sample.labels.items()) if k != "tenant"
                    )
                    key = f"{name}{'[' + label + ']' if label else ''}"
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _wait_idle(admin: Any, token: str, engine: EngineProcess) -> dict[str, int]:
    deadline = time.monotonic() + 15
    state = idle_state(admin, token, engine.scrape())
    while not is_idle(state) and time.monotonic() < deadline:
        time.sleep(0.25)
        state = idle_state(admin, token, engine.scrape())
    return state


def soak(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = resolve_model_path(args.model, cache_dir())
    adapter_root = args.work_dir / "adapters"
    folders = _adapters(model_dir, adapter_root, args.adapters, args.rank)
    tenants = [f"tenant{i}" for i in range(args.tenants)]
    per_tenant = -(-args.streams // args.tenants)
    token = secrets.token_hex(20)
    lo, hi = (int(v) for v in args.prompt_lens.split(","))
    engine_args = [
        "--model", str(model_dir), "--device", args.device,
        "--kv-cache-tokens", str(args.kv_cache_tokens), "--max-num-seqs", str(args.streams),
        "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras),
        "--max-lora-rank", str(max(16, args.rank)), "--adapter-root", str(adapter_root),
        "--max-requests-per-tenant", str(per_tenant), "--admin-token", token,
    ]  # fmt: skip
    plan = SoakPlan(
        args.streams, args.max_new_tokens, (lo, hi), args.duration_s,
        load_model_config(model_dir).vocab_size, args.seed,
    )  # fmt: skip
    log_path = args.work_dir / "engine.log"
    with EngineProcess(engine_args, log_path) as engine:
        log(f"engine starting (log {log_path})")
        log(f"serving after {engine.wait_serving(300):.1f} s")
        channel = grpc.insecure_channel(engine.target)
        admin = engine_admin_pb2_grpc.EngineAdminStub(channel)
        fleet = set_up_fleet(admin, token, folders, tenants)
        warm = burst(engine.target, fleet, 1, plan)  # one request per tenant, untimed
        if not all(r.complete for r in warm):
            raise BenchError(f"warm-up requests failed: {[r.error for r in warm]}")
        before = _counters(engine.scrape())
        load_before = os.getloadavg()[0]
        log(f"soak: {args.streams} streams, {args.adapters} adapters, {args.duration_s:.0f} s")
        with RssSampler(engine.pid, args.rss_interval_s) as rss:
            result = run_soak(engine.target, fleet, plan)
        log(f"soak done: {len(result.records)} requests")
        idle_after = _wait_idle(admin, token, engine)
        refill = burst(engine.target, fleet, per_tenant, plan)
        idle_end = _wait_idle(admin, token, engine)
        after = _counters(engine.scrape())
        channel.close()
    client = client_view(result.records, result.wall_s)
    trend = rss_trend(rss.samples, args.warmup_s)
    refilled = sum(r.complete for r in refill)
    checks = {
        "every request got its full token count": {
            "ok": client["incomplete"] == 0 and client["completed"] > 0,
            "detail": f"{client['completed']} of {client['requests']}"
            + (f"; failures {client['failures']}" if client["failures"] else ""),
        },
        "idle after the soak": {"ok": is_idle(idle_after), "detail": str(idle_after)},
        "each tenant fills its in-flight cap again": {
            "ok": refilled == len(refill),
            "detail": f"{refilled} of {len(refill)} ({per_tenant} per tenant at once)",
        },
        "idle at the end": {"ok": is_idle(idle_end), "detail": str(idle_end)},
        "resident memory flat": {
            "ok": trend["flat"],
            "detail": f"{trend['after_warmup_mib']:.0f} MiB after {args.warmup_s:.0f} s warm-up"
            f" -> {trend['end_mib']:.0f} MiB at the end (growth {trend['growth_mib']:+.1f}, "
            f"allowed {trend['allowed_growth_mib']:.0f})",
        },
    }
    commit, dirty = git_commit(ROOT)
    return {
        "command": shlex.join([Path(sys.executable).name, "bench/soak.py", *sys.argv[1:]]),
        "commit": commit,
        "dirty": dirty,
        "machine": machine_info(),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "config": {
            "model": model_dir.name,
            "device": args.device,
            "streams": args.streams,
            "adapters": args.adapters,
            "tenants": args.tenants,
            "rank": args.rank,
            "max_new_tokens": args.max_new_tokens,
            "prompt_lens": [lo, hi],
            "duration_s": args.duration_s,
            "max_loras": args.max_loras,
            "max_cpu_loras": args.max_cpu_loras,
            "per_tenant_cap": per_tenant,
            "kv_cache_tokens": args.kv_cache_tokens,
            "rss_interval_s": args.rss_interval_s,
        },  # fmt: skip
        "client": client,
        "rss": trend,
        "idle_after": idle_after,
        "idle_end": idle_end,
        "engine_counters": {k: after[k] - before.get(k, 0.0) for k in sorted(after)},
        "checks": checks,
        "passed": all(c["ok"] for c in checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = soak(args)
    except BenchError as exc:
        print(f"soak failed: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    page = markdown(result)
    args.out.with_suffix(".md").write_text(page)
    print(page)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
