"""The serving benchmark's record: machine facts, commit, and the markdown table.

Machine facts are read without initialising CUDA in the bench process (nvidia-smi,
package metadata): the engine process should have the GPU to itself.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "triton", "grpcio", "protobuf", "transformers", "tokenizers", "safetensors")


def gpu_name() -> str:
    """The first GPU's name from nvidia-smi, "" when there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0].strip() if out.strip() else ""


def machine_info() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpu = gpu_name()
    return {
        "gpu": gpu or None,
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def machine_tag(machine: dict[str, Any]) -> str:
    """`h200` for "NVIDIA H200", `cpu` without a GPU."""
    gpu = machine.get("gpu")
    if not gpu:
        return "cpu"
    words = [w for w in re.split(r"[^A-Za-z0-9]+", gpu) if w and w.lower() != "nvidia"]
    return (words[0] if words else "gpu").lower()


def git_commit(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD sha, whether the tree has uncommitted changes), None when not a checkout."""
    if not (root / ".git").exists():
        return None, None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha, bool(dirty)


def result_header(bench: str, preset: str, commit: str, root: Path) -> dict[str, Any]:
    """What every result file starts with: the bench, its preset, the exact command, the
    commit (`commit` as given, else `root`'s HEAD and whether its tree was dirty) and
    the machine."""
    head, dirty = git_commit(root)
    return {
        "bench": bench,
        "preset": preset,
        "command": shlex.join(sys.orig_argv),
        "commit": commit or head,
        "dirty": bool(dirty) and not commit,
        "machine": machine_info(),
    }


def write_result(out_dir: Path, stem: str, result: dict[str, Any], table: str) -> None:
    """`<out_dir>/<stem>.json` (every number) and `.md` (the table); prints the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(table)
    print(f"wrote {out_dir / stem}.json and .md\n\n{table}", flush=True)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _base_rate(result: dict[str, Any], engine: dict[str, Any], name: str) -> float | None:
    """tokens/s of `name`'s base twin: from the same engine, else from any engine."""
    twin = f"{name}-base"
    for candidate in [engine, *result["engines"]]:
        if twin in candidate["workloads"]:
            return candidate["workloads"][twin]["output_tokens_per_s"]
    return None


def markdown(result: dict[str, Any]) -> str:
    """One row per (engine, workload): the table the issue asks for."""
    lines = [
        f"# Serving benchmark, preset {result['preset']}, {result['machine']['gpu'] or 'CPU'}",
        "",
        f"- Command: `{result['command']}`",
        f"- Commit: {result['commit']}" + (" (uncommitted changes)" if result["dirty"] else ""),
        f"- Workload: prompts of {result['prompt_len']} token ids, {result['max_new_tokens']} "
        "new tokens, greedy, ignore_eos; x floor = mean decode step / bytes floor at "
        "4.2 TB/s",
        "",
        "| workload | tokens/s | vs base | TTFT p50/p99 ms | ITL p50/p99 ms | decode step ms "
        "| x floor | slot loads |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine in result["engines"]:
        for name, w in engine["workloads"].items():
            base = _base_rate(result, engine, name) if not name.endswith("-base") else None
            ratio = w["output_tokens_per_s"] / base if base else None
            floor = w["decode_floor"]
            # The floor is HBM time on the GPU; against a CPU run it means nothing.
            x_floor = floor["x_floor"] if result["machine"]["gpu"] else None
            lines.append(
                f"| {name} @{engine['max_loras']} | {w['output_tokens_per_s']:.0f} "
                f"| {_fmt(ratio, 2)} "
                f"| {_fmt(w['ttft_ms']['p50'])} / {_fmt(w['ttft_ms']['p99'])} "
                f"| {_fmt(w['itl_ms']['p50'], 2)} / {_fmt(w['itl_ms']['p99'], 2)} "
                f"| {_fmt(floor['decode_step_ms'], 2)} | {_fmt(x_floor, 2)} "
                f"| {w['engine']['adapter_slot_loads']} |"
            )
    lines.append("")
    for engine in result["engines"]:
        differ = [
            f"{n} {w['outputs_differ_from_base']:.0%}"
            for n, w in engine["workloads"].items()
            if "outputs_differ_from_base" in w
        ]
        start = engine["startup"]
        bound = [n for n, w in engine["workloads"].items() if w["client"]["client_bound"]]
        lines.append(
            f"- max_loras {engine['max_loras']}: SERVING after "
            f"{start['spawn_to_serving_s']:.1f} s, all adapters loaded after "
            f"{start['spawn_to_adapters_loaded_s']:.1f} s; client-bound workloads: "
            f"{', '.join(bound) or 'none'}; requests whose tokens differ from the base "
            f"model's: {', '.join(differ) or '-'}"
        )
        lines.append(f"  - engine: `{shlex.join(engine['flags'])}`")
    return "\n".join(lines) + "\n"
