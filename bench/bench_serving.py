"""End-to-end serving benchmark: a real `loraplex engine serve` process, many concurrent
gRPC streams, output tokens/s and latency percentiles as a client sees them.

    python3 bench/bench_serving.py --out-dir bench/results --commit <sha>      # H200, 8B
    .venv/bin/python bench/bench_serving.py --preset tiny --out-dir /tmp/bench-tiny

Builds (or reuses) seeded fixtures in --work-dir: a random-weight Llama-3.1-8B-shaped
model folder and 100 rank-16 PEFT adapters. For each --max-loras value it starts one
engine, times its start (health SERVING, then every adapter listed), warms it up and runs
the selected workloads (serving_workloads.py), scraping the engine's /metrics before and
after each. Writes <out-dir>/serving_<preset>_<machine>.json (every number) and .md
(the table, also printed last). Exits non-zero with the reason if anything fails; the
engine is stopped on every path.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving_client import RequestSpec  # noqa: E402
from serving_engine import BenchError, EngineProcess  # noqa: E402
from serving_host import HostProbe  # noqa: E402
from serving_report import (  # noqa: E402
    machine_tag,
    markdown,
    result_header,
    write_result,
)
from serving_spec import PRESETS, Preset, adapter_ids  # noqa: E402
from serving_stats import decode_floor, engine_view, summarize_runs  # noqa: E402
from serving_workloads import ClientPool, RunResult, build, expand  # noqa: E402

_T0 = time.monotonic()


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def fixture_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every benchmark that runs an engine on the serving fixtures."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/loraplex-bench"))
    parser.add_argument("--commit", default="", help="recorded as is (default: git HEAD)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--engine-arg", action="append", default=[], help="extra engine flag (repeatable)"
    )
    parser.add_argument("--machine-tag", default="", help="default: from the GPU name")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fixture_arguments(parser)
    parser.add_argument("--workloads", default="W1,W2,B1,W3", help="groups or single names")
    parser.add_argument("--max-loras", default="", help="comma list; one engine per value")
    parser.add_argument(
        "--workloads-at-100", default="W2-lora", help="what the --max-loras 100 engine runs"
    )
    parser.add_argument("--engine-root", type=Path, default=None, help="run that checkout")
    parser.add_argument("--client-procs", type=int, default=0, help="0 = the preset's")
    parser.add_argument("--w3-rates", default="", help="requests/s, comma list (default: preset)")
    parser.add_argument("--w3-duration", type=float, default=0.0, help="s per W3 rate")
    parser.add_argument(
        "--py-spy", type=Path, default=None, help="write py-spy profiles of each workload here"
    )
    args = parser.parse_args(argv)
    if args.py_spy is not None and shutil.which("py-spy") is None:
        parser.error("--py-spy needs the py-spy program on PATH (pip install py-spy)")
    return args


def engine_args(preset: Preset, fixtures: dict, max_loras: int, extra: list[str]) -> list[str]:
    return [
        "--model", fixtures["model_dir"],
        "--device", preset.device,
        "--dtype", preset.engine_dtype,
        "--adapter-dir", fixtures["adapter_dir"],
        "--max-num-seqs", str(preset.max_num_seqs),
        "--max-num-batched-tokens", str(preset.max_num_batched_tokens),
        "--max-loras", str(max_loras),
        "--max-lora-rank", str(preset.lora_rank),
        "--max-cpu-loras", str(preset.max_cpu_loras),
        *extra,
    ]  # fmt: skip


def build_fixtures(preset: Preset, work_dir: Path, seed: int) -> dict:
    """In a child process, so this process never holds CUDA memory the engine wants."""
    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_fixtures_child, preset, str(work_dir), seed, _T0).result()


def _fixtures_child(preset: Preset, work_dir: str, seed: int, t0: float) -> dict:
    from serving_fixtures import ensure_fixtures

    global _T0
    _T0 = t0  # monotonic is one clock for all processes: the log's offsets line up

    return ensure_fixtures(preset, Path(work_dir), seed, log=log)


def warmup_runs(preset: Preset) -> list[tuple[RequestSpec, ...]]:
    """A few requests (adapters and base), then a burst as wide as the batch can be, with
    short outputs, so kernel compilation for large shapes happens before any timing."""
    ids = adapter_ids(preset.num_adapters)
    adapters = [ids[i % len(ids)] for i in range(preset.warmup_requests)] + [""]
    prompt = tuple(range(3, 3 + preset.prompt_len))
    few = tuple(
        RequestSpec(i, a, prompt, preset.max_new_tokens, 0.0) for i, a in enumerate(adapters)
    )
    short = max(2, preset.max_new_tokens // 8)
    burst = tuple(
        RequestSpec(i, ids[i % len(ids)], prompt, short, 0.0)
        for i in range(min(preset.max_num_seqs, preset.w2_requests))
    )
    return [few, burst]


def run_engine(
    args: argparse.Namespace,
    preset: Preset,
    fixtures: dict,
    max_loras: int,
    names: list[str],
    clients: ClientPool,
    raw: Any,
) -> dict[str, Any]:
    flags = engine_args(preset, fixtures, max_loras, args.engine_arg)
    log_path = args.work_dir / f"engine-{preset.name}-loras{max_loras}.log"
    with EngineProcess(flags, log_path, args.engine_root) as engine:
        log(f"engine (max_loras {max_loras}) spawned, log {log_path}")
        startup = engine.wait_ready(preset.num_adapters, preset.start_timeout_s)
        log(
            f"SERVING after {startup['spawn_to_serving_s']:.1f} s, "
            f"{preset.num_adapters} adapters listed after "
            f"{startup['spawn_to_adapters_loaded_s']:.1f} s"
        )
        try:
            for run in warmup_runs(preset):
                clients.run(engine.target, run)
        except BenchError as exc:
            raise engine.annotate(BenchError(f"warm-up: {exc}")) from exc
        log("warm-up done")
        workloads: dict[str, Any] = {}
        outputs: dict[str, list[list[int]]] = {}
        for name in names:
            workload = build(name, preset, args.seed)
            before = engine.scrape()
            probe = HostProbe(engine.pid, f"{name}_loras{max_loras}", args.py_spy)
            try:
                with probe:
                    results: list[RunResult] = [
                        clients.run(engine.target, r) for r in workload.runs
                    ]
            except BenchError as exc:
                raise engine.annotate(BenchError(f"{name}: {exc}")) from exc
            after = engine.scrape()
            view = summarize_runs(results)
            view["engine"] = engine_view(before, after)
            view["engine_host"] = probe.result()
            view["decode_floor"] = decode_floor(preset, workload, view, view["engine"], max_loras)
            view["base_of"] = workload.base_of
            view["num_adapters"] = workload.num_adapters
            workloads[name] = view
            outputs[name] = [rec.output_ids for r in results for rec in r.records]
            _write_raw(raw, max_loras, name, results)
            log(
                f"{name} @{max_loras}: {view['output_tokens_per_s']:.0f} tok/s, "
                f"TTFT p50 {view['ttft_ms']['p50']:.1f} ms, ITL p50 {view['itl_ms']['p50']:.2f}"
                f" ms, client cpu share {view['client']['max_cpu_share_of_one_core']:.2f}"
            )
        _compare_with_base(workloads, outputs)
        code = engine.stop()
        log(f"engine stopped (exit code {code})")
        return {
            "max_loras": max_loras,
            "command": shlex.join(engine.command),
            "flags": flags,
            "log": str(log_path),
            "startup": startup,
            "exit_code": code,
            "workloads": workloads,
        }


def _compare_with_base(workloads: dict[str, Any], outputs: dict[str, list[list[int]]]) -> None:
    """Share of an adapter workload's requests whose tokens differ from its base twin's
    (same prompts): near 1 shows the adapters really take part."""
    for name, view in workloads.items():
        twin = outputs.get(f"{name}-base")
        if twin is None or name.endswith("-base"):
            continue
        ours = outputs[name]
        differ = sum(a != b for a, b in zip(ours, twin, strict=True)) / len(ours)
        view["outputs_differ_from_base"] = differ
        if differ == 0:
            log(f"WARNING: {name} produced exactly the base model's tokens")


def _write_raw(raw: Any, max_loras: int, name: str, results: list[RunResult]) -> None:
    for run, result in enumerate(results):
        for record in result.records:
            line = {"max_loras": max_loras, "workload": name, "run": run, **asdict(record)}
            raw.write(json.dumps(line) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (a timeout killing the bench) unwinds like an error, so the engine stops.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    preset = PRESETS[args.preset]
    if args.w3_rates:
        preset = replace(preset, w3_rates=tuple(float(r) for r in args.w3_rates.split(",")))
    if args.w3_duration:
        preset = replace(preset, w3_duration_s=args.w3_duration)
    loras = [int(v) for v in args.max_loras.split(",") if v] or list(preset.max_loras)
    names = expand(args.workloads, preset)
    names_at_100 = expand(args.workloads_at_100, preset)
    result: dict[str, Any] = {
        **result_header("serving", preset.name, args.commit, args.engine_root or ROOT),
        "engine_root": str(args.engine_root or ROOT),
        "seed": args.seed,
        "prompt_len": preset.prompt_len,
        "max_new_tokens": preset.max_new_tokens,
        "preset_spec": asdict(preset),
        "engines": [],
    }
    stem = f"serving_{preset.name}_{args.machine_tag or machine_tag(result['machine'])}"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    clients = None
    try:
        log(f"preset {preset.name}, max_loras {loras}, workloads {names}")
        result["fixtures"] = build_fixtures(preset, args.work_dir, args.seed)
        clients = ClientPool(args.client_procs or preset.client_procs)
        log(f"{clients.num_procs} client process(es) ready")
        result["requests_file"] = str(args.work_dir / f"{stem}_requests.jsonl.gz")
        with gzip.open(result["requests_file"], "wt") as raw:
            for max_loras in loras:
                chosen = names_at_100 if max_loras == 100 else names
                result["engines"].append(
                    run_engine(args, preset, result["fixtures"], max_loras, chosen, clients, raw)
                )
    except (BenchError, OSError) as exc:
        print(f"bench_serving: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if clients is not None:
            clients.close()
    result["wall_s"] = time.monotonic() - _T0
    log(f"done in {result['wall_s']:.0f} s")
    write_result(args.out_dir, stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
