"""Time the fused decode LoRA kernel ("bgmv_fused") against the current forms at decode.

GPU only. Usage: python bench/bench_lora_fused.py --out bench/results/lora_fused.json

Llama-3.1-8B groups (q/k/v, o, gate/up, down), rank-16 adapters in a 32-slot pool,
32 decode tokens: "distinct" (32 adapters, one per token) and "shared" (all one
adapter). Per group: add_lora in the form `choose_form` picks ("auto"), in "bgmv" (what
the decode CUDA graphs run today) and in "bgmv_fused" with its heuristic config, plus a
few variants of that config (tiles, warps, stages, chunk size) to tune the heuristic.
Every launch is first checked against the torch reference computed in float32 from the
same (upcast) inputs; the max abs error is printed. A failing variant (e.g. a compile
error) is reported and skipped, never fatal.

Timing as in `bench_lora_kernels.py`: a CUDA graph of one call, replayed under
`triton.testing.do_bench` (median, L2 flushed before every replay). The floor is the
bytes the fused form must move at 4.2 TB/s: x, each distinct adapter's A and B, out
read and written (no h).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_lora_kernels import GROUPS, floor_us, graph_us  # noqa: E402

from engine.kernels import add_lora, build_meta, choose_form  # noqa: E402
from engine.kernels.bgmv_fused import FusedConfig, bgmv_fused_add, default_config  # noqa: E402
from engine.kernels.reference import add_lora_ref  # noqa: E402

NUM_TOKENS, NUM_SLOTS = 32, 32
DEVICE, DTYPE = "cuda", torch.bfloat16  # module constants so a CPU dry run can patch them
SCENARIOS = {
    "distinct": torch.randperm(NUM_SLOTS, generator=torch.Generator().manual_seed(0)).tolist(),
    "shared": [0] * NUM_TOKENS,
}


def variants(cfg: FusedConfig) -> dict[str, FusedConfig]:
    """The heuristic config and a few one-knob changes of it."""
    rep = dataclasses.replace
    half_chunk = max(cfg.block_n, (cfg.chunk_rows // 2) // cfg.block_n * cfg.block_n)
    return {
        "default": cfg,
        "k/2": rep(cfg, block_k=max(32, cfg.block_k // 2)),
        "k*2,w16": rep(cfg, block_k=cfg.block_k * 2, num_warps=16),
        "w4": rep(cfg, num_warps=4),
        "st1": rep(cfg, num_stages=1),
        "st3": rep(cfg, num_stages=3),
        "chunk/2": rep(cfg, chunk_rows=half_chunk),
        "chunk*2": rep(cfg, chunk_rows=cfg.chunk_rows * 2),
    }


def run_case(scenario: str, group: str, rank: int, warmup: int, rep: int, sweep: bool) -> dict:
    in_features, slices = GROUPS[group]
    token_slots = SCENARIOS[scenario]
    total_out, n_slices = sum(slices), len(slices)
    offsets = [sum(slices[:i]) for i in range(n_slices + 1)]
    dev, dt = torch.device(DEVICE), DTYPE
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(NUM_TOKENS, in_features, device=dev, dtype=dt, generator=gen)
    lora_a = torch.zeros(NUM_SLOTS, n_slices, rank, in_features, device=dev, dtype=dt)
    lora_b = torch.zeros(NUM_SLOTS, total_out, rank, device=dev, dtype=dt)
    lora_a.normal_(0.0, in_features**-0.5, generator=gen)
    lora_b.normal_(0.0, rank**-0.5, generator=gen)
    out0 = torch.randn(NUM_TOKENS, total_out, device=dev, dtype=dt, generator=gen)
    out = out0.clone()  # timed replays keep adding into this one
    meta = build_meta(token_slots, [rank] * NUM_SLOTS, dev)
    h = torch.zeros(NUM_TOKENS, n_slices, rank, device=dev, dtype=torch.float32)

    ref = out0.float().clone()  # a copy even when out is already float32
    add_lora_ref(x.float(), lora_a.float(), lora_b.float(), ref, offsets, meta)
    scale = max(1.0, float(ref.abs().max()))

    def check(fn: Callable[[torch.Tensor], None]) -> float:
        trial = out0.clone()
        fn(trial)
        if trial.is_cuda:
            torch.cuda.synchronize()
        return float((trial.float() - ref).abs().max())

    adapters = len(set(token_slots))
    elt = x.element_size()
    floor_bytes = (
        NUM_TOKENS * in_features * elt
        + adapters * (n_slices * rank * in_features + total_out * rank) * elt
        + 2 * NUM_TOKENS * total_out * elt
    )
    row: dict = {
        "scenario": scenario, "group": group, "tokens": NUM_TOKENS, "adapters": adapters,
        "rank": rank, "in": in_features, "slices": list(slices), "auto_form": choose_form(meta),
        "floor_us": floor_us(floor_bytes), "tolerance": 2**-6 * scale,
    }  # fmt: skip
    for name, form in (("auto", None), ("bgmv", "bgmv")):

        def call(o: torch.Tensor, f: str | None = form) -> None:
            add_lora(x, lora_a, lora_b, o, offsets, meta, form=f, h=h)  # type: ignore[arg-type]

        row[f"{name}_err"] = check(call)
        row[f"{name}_us"] = graph_us(lambda c=call: c(out), warmup, rep)

    base = default_config(lora_a, out, offsets, meta)
    configs = variants(base) if sweep else {"default": base}
    row["sweep"] = {}
    for name, cfg in configs.items():
        entry: dict = {"config": dataclasses.asdict(cfg)}
        try:

            def call(o: torch.Tensor, c: FusedConfig = cfg) -> None:
                bgmv_fused_add(x, lora_a, lora_b, o, offsets, meta, c)

            entry["err"] = check(call)
            entry["us"] = graph_us(lambda c=call: c(out), warmup, rep)
        except Exception as exc:  # a variant that does not compile must not end the run
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  {scenario}/{group} fused {name}: {entry['error']}", flush=True)
        row["sweep"][name] = entry
    fused = row["sweep"]["default"]
    row["fused_us"] = fused.get("us", float("nan"))
    row["fused_err"] = fused.get("err", float("nan"))
    timed = {k: v for k, v in row["sweep"].items() if "us" in v}
    best = min(timed, key=lambda k: timed[k]["us"]) if timed else "default"
    row["best"], row["best_us"] = best, timed.get(best, {}).get("us", float("nan"))
    errs = [row["auto_err"], row["bgmv_err"], *(v["err"] for v in timed.values())]
    row["all_correct"] = all(e <= row["tolerance"] for e in errs)
    return row


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'scenario':>8} {'group':>7} {'auto':>10} {'bgmv':>6} {'fused':>6} "
        f"{'best':>6} {'(variant)':>10} {'floor':>6} {'fused_err':>9} {'ok':>3}"
    )
    print(head)
    for r in rows:
        auto = f"{r['auto_us']:.1f}({r['auto_form']})"
        print(
            f"{r['scenario']:>8} {r['group']:>7} {auto:>10} {r['bgmv_us']:>6.1f} "
            f"{r['fused_us']:>6.1f} {r['best_us']:>6.1f} {r['best']:>10} {r['floor_us']:>6.1f} "
            f"{r['fused_err']:>9.2e} {'yes' if r['all_correct'] else 'NO':>3}"
        )
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        sel = [r for r in rows if r["scenario"] == scenario]
        sums = {k: sum(r[k] for r in sel) for k in ("auto_us", "bgmv_us", "fused_us", "floor_us")}
        print(
            f"{scenario:>8} {'layer':>7} {sums['auto_us']:>10.1f} {sums['bgmv_us']:>6.1f} "
            f"{sums['fused_us']:>6.1f} {'':>6} {'':>10} {sums['floor_us']:>6.1f}"
        )
    print("microseconds, CUDA-graph replay, do_bench median, L2 flushed; floor: bytes at 4.2 TB/s")
    print("variants (us per group):")
    for r in rows:
        cells = " ".join(f"{k}={v.get('us', float('nan')):.1f}" for k, v in r["sweep"].items())
        print(f"  {r['scenario']}/{r['group']}: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--no-sweep", action="store_true", help="heuristic fused config only")
    parser.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=40, help="do_bench repetitions, ms")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lora_fused needs a CUDA device")
    import triton

    start = time.perf_counter()
    rows = []
    for scenario in args.scenarios:
        for group in args.groups:
            rows.append(
                run_case(scenario, group, args.rank, args.warmup, args.rep, not args.no_sweep)
            )
            print(f"  done {scenario}/{group} at {time.perf_counter() - start:.1f} s", flush=True)
    print_table(rows)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} after {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
