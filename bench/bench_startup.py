"""Engine start-up: how long a real `loraplex engine serve` takes from spawn to SERVING
on the serving benchmark's model and adapters, cold (an empty Triton kernel cache, so
every kernel compiles: a node's first start) and then warm (a restart that finds the
kernels the cold start compiled), split into the phases the engine logs.

    python3 bench/bench_startup.py --out-dir bench/results --commit <sha>     # H200, 8B
    git worktree add /tmp/before <sha-before>
    python3 bench/bench_startup.py --baseline /tmp/before --rounds 2 --out-dir bench/results
    .venv/bin/python bench/bench_startup.py --preset tiny --out-dir /tmp/startup-tiny

Issue 7's target is SERVING within 15 s of the weights being loaded: `after_weights_s`,
from the engine's "loaded the model's weights" log line to its "engine serving on" line.
Read it beside `spawn_to_serving_s`, what a restart costs: work that runs beside the
weight load (the tokenizer) lengthens the weights phase instead. The starts share one
Triton cache folder under --work-dir: a cold start empties it first, a warm one finds
what the start before compiled; after a cold start the kernels it compiled are counted
by name. `--py-spy DIR` records each start with py-spy (on PATH).

Start-up times on one machine vary by seconds from run to run, so compare code in one
invocation: `--baseline DIR` (another checkout, e.g. a `git worktree` of the commit
before) alternates its starts with this tree's, `--rounds N` times, in the order
baseline, this, this, baseline, ... so neither side always goes first; the table ends
with each side's median. `after_weights_s` compares across versions; the phase columns
follow this tree's log lines (older code logged its compile passes otherwise).
Writes <out-dir>/startup_<preset>_<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from bench_serving import build_fixtures, engine_args, fixture_arguments, log
from serving_engine import BenchError, EngineProcess
from serving_host import HostProbe
from serving_report import machine_tag, result_header, write_result
from serving_spec import PRESETS

ROOT = Path(__file__).resolve().parent.parent

# Phase -> the engine log line that reports its seconds: the weights, one compile-ahead
# pass for every graph and eager shape, the captures, the eager warm-up, the adapters.
PHASES = {
    "weights_s": r"loaded the model's weights in ([\d.]+) s",
    "compile_ahead_s": r"compiled the Triton kernels ahead in ([\d.]+) s",
    "decode_graphs_s": r"captured \d+ decode CUDA graphs in ([\d.]+) s",
    "mixed_graphs_s": r"captured \d+ mixed-step CUDA graphs in ([\d.]+) s",
    "warm_up_s": r"warmed up the eager path in ([\d.]+) s",
    "preload_s": r"preloaded \d+ adapters in ([\d.]+) s",
}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fixture_arguments(parser)
    parser.add_argument("--max-loras", type=int, default=32)
    parser.add_argument("--starts", default="cold,warm", help="comma list of cold / warm")
    parser.add_argument("--py-spy", type=Path, default=None, help="record each start here")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout to compare")
    parser.add_argument("--rounds", type=int, default=1, help="starts of each kind per side")
    args = parser.parse_args(argv)
    starts = args.starts.split(",")
    if not starts or any(s not in ("cold", "warm") for s in starts):
        parser.error(f"--starts takes cold and/or warm, got {args.starts!r}")
    if args.py_spy is not None and shutil.which("py-spy") is None:
        parser.error("--py-spy needs the py-spy program on PATH (pip install py-spy)")
    if args.baseline is not None and not (args.baseline / "engine").is_dir():
        parser.error(f"--baseline {args.baseline} is not a loraplex checkout (no engine/)")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def log_phases(text: str) -> dict[str, float]:
    """Seconds of each phase the engine logged, and `after_weights_s`: from the weights
    line to the "engine serving on" line (`other_s`: what the phases between leave)."""
    phases: dict[str, float] = {}
    stamps: dict[str, datetime] = {}
    for line in text.splitlines():
        for name, pattern in PHASES.items():
            if found := re.search(pattern, line):
                phases[name] = float(found.group(1))
                if name == "weights_s" and (stamp := _STAMP.match(line)):
                    stamps["weights"] = _parse_stamp(stamp.group(1))
        if "engine serving on" in line and (stamp := _STAMP.match(line)):
            stamps["serving"] = _parse_stamp(stamp.group(1))
    if "weights" in stamps and "serving" in stamps:
        after = (stamps["serving"] - stamps["weights"]).total_seconds()
        phases["after_weights_s"] = after
        between = ("compile_ahead_s", "decode_graphs_s", "mixed_graphs_s", "warm_up_s")
        phases["other_s"] = after - sum(phases.get(name, 0.0) for name in between)
    return phases


def _parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def compiled_kernels(cache_dir: Path) -> dict[str, int]:
    """Kernel name -> how many variants of it sit compiled in a Triton cache folder."""
    names = Counter(
        path.stem
        for path in cache_dir.rglob("*.json")
        if not path.name.startswith("__grp__") and path.with_suffix(".cubin").exists()
    )
    return dict(names.most_common())


def one_start(
    args: argparse.Namespace, fixtures: dict, kind: str, code: str, root: Path | None
) -> dict[str, Any]:
    """One engine start of `kind` (cold or warm) of the checkout `root` (None: this
    tree), labelled `code` in the results."""
    preset = PRESETS[args.preset]
    cache = args.work_dir / f"triton-cache-{args.preset}"
    if kind == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # the engine inherits it
    flags = engine_args(preset, fixtures, args.max_loras, args.engine_arg)
    log_path = args.work_dir / f"startup-{args.preset}-{kind}.log"
    with EngineProcess(flags, log_path, root) as engine:
        log(f"{code} {kind} start: engine spawned, log {log_path}")
        with HostProbe(engine.pid, f"startup_{kind}", args.py_spy):
            ready = engine.wait_ready(preset.num_adapters, preset.start_timeout_s)
        exit_code = engine.stop()
    if exit_code not in (0, None):
        raise BenchError(f"the engine exited with code {exit_code} after a {kind} start")
    view = {
        "start": kind,
        "code": code,
        "command": shlex.join(engine.command),
        "spawn_to_serving_s": ready["spawn_to_serving_s"],
        "spawn_to_adapters_loaded_s": ready["spawn_to_adapters_loaded_s"],
        **log_phases(log_path.read_text(errors="replace")),
    }
    if kind == "cold":
        view["kernels_compiled"] = compiled_kernels(cache)
    log(
        f"{code} {kind} start: SERVING {view['spawn_to_serving_s']:.1f} s after spawn, "
        f"{view.get('after_weights_s', float('nan')):.1f} s after the weights"
    )
    return view


def markdown(result: dict[str, Any]) -> str:
    columns = ["spawn_to_serving_s", "weights_s", "after_weights_s", *PHASES, "other_s"]
    columns = list(dict.fromkeys(columns))  # weights_s once
    lines = [
        f"# Engine start-up, preset {result['preset']}, {result['machine'].get('gpu')}",
        "",
        f"- Command: `{result['command']}`",
        f"- Commit: {result['commit']}",
        "",
        "| code | start | "
        + " | ".join(c.removesuffix("_s").replace("_", " ") for c in columns)
        + " |",
        "| --- | --- |" + " ---: |" * len(columns),
    ]
    for run in result["starts"]:
        cells = [f"{run[c]:.1f}" if c in run else "" for c in columns]
        lines.append(f"| {run['code']} | {run['start']} | " + " | ".join(cells) + " |")
    medians = []
    for code in dict.fromkeys(run["code"] for run in result["starts"]):
        for kind in ("cold", "warm"):
            after = [
                run["after_weights_s"]
                for run in result["starts"]
                if run["code"] == code and run["start"] == kind and "after_weights_s" in run
            ]
            if after:
                medians.append(f"{code} {kind} {statistics.median(after):.1f} s")
    if medians:
        lines += ["", "Median seconds after the weights: " + ", ".join(medians) + "."]
    for run in result["starts"]:
        if run.get("kernels_compiled"):
            counts = run["kernels_compiled"]
            listed = ", ".join(f"{name} {n}" for name, n in counts.items())
            total = sum(counts.values())
            lines += ["", f"Kernels compiled by {run['code']}'s cold start ({total}): {listed}"]
    return "\n".join(lines) + "\n"


def sides(args: argparse.Namespace, commit: str) -> list[list[tuple[str, Path | None]]]:
    """(code label, checkout) in start order, one list per round: this tree alone, or
    with `--baseline` the two sides in turn, each round in the other round's order."""
    this = (commit[:12], None)
    if args.baseline is None:
        return [[this] for _ in range(args.rounds)]
    baseline = (f"baseline {_short_head(args.baseline)}", args.baseline)
    return [[baseline, this] if r % 2 == 0 else [this, baseline] for r in range(args.rounds)]


def _short_head(root: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or str(root)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    result = {**result_header("startup", preset.name, args.commit, ROOT), "starts": []}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        fixtures = build_fixtures(preset, args.work_dir, args.seed)
        for round_sides in sides(args, result["commit"]):
            for code, root in round_sides:
                for kind in args.starts.split(","):
                    result["starts"].append(one_start(args, fixtures, kind, code, root))
    except (BenchError, OSError) as exc:
        print(f"bench_startup: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    stem = f"startup_{preset.name}_{args.machine_tag or machine_tag(result['machine'])}"
    write_result(args.out_dir, stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
