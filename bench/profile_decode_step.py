"""Where a decode step's GPU time goes, kernel by kernel, for any checkout. GPU only.

    python3 bench/profile_decode_step.py --out profile.json [--root OLD_CHECKOUT]

Builds the same random Llama-3.1-8B-shaped model, KV cache and rank-16 slot pool as
`bench_decode_step.py`, then for each batch size and scenario (base model; every row
its own adapter; rows spread over 32 adapters) it (1) times the CUDA-graph step
(`ModelRunner.execute`, median of `--steps` after warm-up, CUDA events) and (2)
profiles `--profile-steps` eager steps with the torch profiler, counting kernels per
step and summing their device time by category. Graph step time minus kernel time is
what launch gaps and host work cost.

`--root` imports the engine from another checkout (for a before/after table in one
run); the script itself only uses APIs both sides have.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

CATEGORIES = (  # first match wins; matched against lower-cased kernel names
    ("lora", ("bgmv", "sgmv", "lora")),
    ("attention", ("attention", "decode_kernel", "merge_splits", "flash", "fmha", "sdpa")),
    ("gemm", ("nvjet", "gemm", "gemv", "cutlass", "sm90_xmma", "cublas", "matmul", "splitk")),
    ("norm_rope_act", ("rms", "rope", "silu", "norm")),
    ("kv_write", ("index_copy", "indexcopy", "scatter")),
)


def categorise(name: str) -> str:
    lower = name.lower()
    for category, needles in CATEGORIES:
        if any(n in lower for n in needles):
            return category
    return "other"


def load_decode_bench(root: Path):
    """Import `engine` from `root`, then this tree's bench_decode_step on top of it."""
    sys.path.insert(0, str(root))
    import engine.model.llama  # noqa: F401  (binds the `engine` package to `root`)

    path = Path(__file__).with_name("bench_decode_step.py")
    spec = importlib.util.spec_from_file_location("bench_decode_step", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def profile_steps(torch, runner, batch, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from engine.sampling import SamplingParams

    params = [SamplingParams(temperature=0.0)] * len(batch.seqs)
    generators = [torch.Generator() for _ in batch.seqs]
    for _ in range(3):
        runner.execute(batch, params, generators)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.execute(batch, params, generators)
        torch.cuda.synchronize()
    by_category: dict[str, float] = {}
    count = 0
    top: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        count += 1
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time
        category = categorise(event.name)
        by_category[category] = by_category.get(category, 0.0) + us
        top.setdefault(event.name[:80], [0, 0.0])
        top[event.name[:80]][0] += 1
        top[event.name[:80]][1] += us
    per_step = {k: v / steps / 1e3 for k, v in by_category.items()}  # ms per step
    heaviest = sorted(top.items(), key=lambda kv: -kv[1][1])[:12]
    return {
        "kernels_per_step": count / steps,
        "kernel_ms_per_step": sum(per_step.values()),
        "ms_by_category": per_step,
        "top_kernels": [
            {"name": n, "per_step": c / steps, "ms_per_step": us / steps / 1e3}
            for n, (c, us) in heaviest
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--label", default="")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    bench = load_decode_bench(Path(args.root).resolve())
    import torch

    from engine.cuda_graphs import DecodeGraphs
    from engine.runner import ModelRunner

    if not torch.cuda.is_available():
        print("profile_decode_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    model, cache, pool, blocks_per_seq = bench.build(max(batches), args.context, args.rank)
    graphs = DecodeGraphs(
        model, cache, pool, max_num_seqs=max(batches), max_model_len=bench.MAX_MODEL_LEN,
        pad_block=cache.num_blocks - 1,
    )  # fmt: skip
    graphs.capture(sizes=[b for b in graphs.sizes if b in batches])
    graph_runner = ModelRunner(model, cache, pool, "triton", graphs)
    eager_runner = ModelRunner(model, cache, pool, "triton")
    results = []
    for size in batches:
        scenarios = {
            "base": [-1] * size,
            "distinct": list(range(size)),
            "shared32": [i % 32 for i in range(size)],  # W2: many rows over 32 adapters
        }
        for scenario, slots in scenarios.items():
            batch = bench.make_batch(slots, args.context, blocks_per_seq)
            replays = graphs.num_replays
            times = bench.time_steps(graph_runner, batch, 5, args.steps)
            assert graphs.num_replays > replays, "the CUDA graph was not used"
            parts = bench.floor_bytes(model, pool, size, args.context, len(set(slots) - {-1}))
            row = {
                "batch": size,
                "scenario": scenario,
                "graph_step_ms": statistics.median(times),
                "floor_ms": sum(parts.values()) / bench.HBM_BYTES_PER_S * 1e3,
                **profile_steps(torch, eager_runner, batch, args.profile_steps),
            }
            results.append(row)
            print(
                f"{args.label:<8} B={size:<4} {scenario:<9} graph {row['graph_step_ms']:7.2f} ms"
                f"  floor {row['floor_ms']:5.2f}  kernels/step {row['kernels_per_step']:6.0f}"
                f"  kernel ms {row['kernel_ms_per_step']:6.2f}  "
                + " ".join(f"{k}={v:.2f}" for k, v in sorted(row["ms_by_category"].items())),
                flush=True,
            )
    print(f"total {time.perf_counter() - t0:.1f} s", flush=True)
    if args.out:
        report = {
            "label": args.label,
            "root": args.root,
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "context": args.context,
            "rank": args.rank,
            "results": results,
        }
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
