"""Time multi-LoRA add_lora (SGMV, BGMV, torch) against the base GEMM at Llama-3.1-8B shapes.

GPU only. Usage: python bench/bench_lora_kernels.py --out bench/results/lora_kernels.json

Scenarios (default: decode and prefill):
- decode: 32 tokens with 32 distinct rank-16 adapters;
- prefill: 4096 tokens with 8 adapters (512 tokens each);
- mixed: one 512-token prefill chunk beside 31 decode tokens of other adapters;
- sharedN (shared2, shared4, ...): 64 decode tokens, N per adapter, interleaved, to
  place the SGMV/BGMV crossover;
- single: one decode token with an adapter (B1).
For every projection group of a layer (q/k/v, o, gate/up, down) it times the base GEMM,
the LoRA shrink and expand of each form, add_lora in each form and in the form
`choose_form` picks, and the torch reference. And the shrink folded into the base GEMM
(`fold_*`, as the engine's bucket-1 "fold" graph does with one slot): one GEMM over the
weight with every pool slot's A rows after it, then the expand from one bf16 plane of
its output; `fold_us` against `base_us + bgmv_us` says what folding saves, for one slot
(single) and for 32 (decode, where each token's h would sit at its slot's columns: the
timed expand reads the first slot's, the same cost; the check gathers each token's own).

Timing: `triton.testing.do_bench` (median), which flushes the L2 before every run, so
adapters come from HBM as in a real forward pass where the base weights evict them.
Device times replay a CUDA graph of the op (one graph launch per run, so host-side
launch cost is out of the number, as in the engine's graphed decode); `eager_us` calls
add_lora directly and so also counts Python and Triton launch overhead. The floors are
bytes that must move at 4.2 TB/s (the measured copy rate): base = W + x + out;
LoRA = x rows + each distinct adapter's A and B + out read and written + h written and
read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels import add_lora, build_meta, choose_form, lora_expand, lora_shrink  # noqa: E402
from engine.kernels.lora_ops import new_scratch  # noqa: E402

HBM_BYTES_PER_S = 4.2e12
HIDDEN, Q, KV, INTERMEDIATE = 4096, 4096, 1024, 14336
GROUPS: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv": (HIDDEN, (Q, KV, KV)),
    "o": (Q, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (HIDDEN,)),
}


def scenario_slots(name: str) -> tuple[list[int], int]:
    """Token slots of the batch and the number of adapters (slots) in the pool."""
    if name == "decode":
        order = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist()
        return order, 32
    if name == "prefill":
        return [s for s in range(8) for _ in range(512)], 8
    if name == "mixed":  # one 512-token prefill chunk beside 31 decode tokens
        return [0] * 512 + list(range(1, 32)), 32
    if name == "single":
        return [0], 1
    if name.startswith("shared"):  # e.g. shared4: 64 decode tokens, 4 per adapter
        per_adapter = int(name.removeprefix("shared"))
        return [t % (64 // per_adapter) for t in range(64)], 64 // per_adapter
    raise ValueError(f"unknown scenario {name!r}")


def bench_ms(fn: Callable[[], object], warmup: int, rep: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_us(fn: Callable[[], object], warmup: int, rep: int) -> float:
    """Device time of `fn` in microseconds, replayed from a CUDA graph."""
    fn()  # compile before capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * bench_ms(graph.replay, warmup, rep)


def floor_us(num_bytes: float) -> float:
    return num_bytes / HBM_BYTES_PER_S * 1e6


def run_case(scenario: str, group: str, rank: int, r_max: int, warmup: int, rep: int) -> dict:
    in_features, slices = GROUPS[group]
    token_slots, num_slots = scenario_slots(scenario)
    num_tokens, total_out, n_slices = len(token_slots), sum(slices), len(slices)
    offsets = [0]
    for size in slices:
        offsets.append(offsets[-1] + size)
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(num_tokens, in_features, device=dev, dtype=dt)  # [T, in] bf16
    w = torch.randn(total_out, in_features, device=dev, dtype=dt) / in_features**0.5
    lora_a = torch.zeros(num_slots, n_slices, r_max, in_features, device=dev, dtype=dt)
    lora_b = torch.zeros(num_slots, total_out, r_max, device=dev, dtype=dt)
    lora_a[:, :, :rank] = torch.randn_like(lora_a[:, :, :rank]) / in_features**0.5
    lora_b[:, :, :rank] = torch.randn_like(lora_b[:, :, :rank]) / rank**0.5
    out = torch.randn(num_tokens, total_out, device=dev, dtype=dt)  # [T, total_out] bf16
    meta = build_meta(token_slots, [rank] * num_slots, dev)
    h = new_scratch(num_tokens, n_slices, r_max, dev)  # [MAX_SPLIT_K, T, n_slices, r_max] f32

    elt = x.element_size()
    adapters = len(set(token_slots))
    base_bytes = (total_out * in_features + num_tokens * in_features + num_tokens * total_out) * elt
    h_bytes = 2 * num_tokens * n_slices * rank * 4
    lora_bytes = (
        num_tokens * in_features * elt
        + adapters * (n_slices * rank * in_features + total_out * rank) * elt
        + 2 * num_tokens * total_out * elt
        + h_bytes
    )
    row: dict = {
        "scenario": scenario, "group": group, "tokens": num_tokens, "adapters": adapters,
        "rank": rank, "r_max": r_max, "in": in_features, "slices": list(slices),
        "auto_form": choose_form(meta),
        "base_floor_us": floor_us(base_bytes), "lora_floor_us": floor_us(lora_bytes),
        "base_tflops_floor_us": 2 * num_tokens * in_features * total_out / 790e12 * 1e6,
    }  # fmt: skip
    row["base_us"] = graph_us(lambda: torch.mm(x, w.t(), out=out), warmup, rep)
    for form in ("sgmv", "bgmv"):
        row[f"{form}_shrink_us"] = graph_us(
            lambda f=form: lora_shrink(x, lora_a, meta, f, h=h), warmup, rep
        )
        # The expand reads the split planes this form's shrink writes.
        planes = lora_shrink(x, lora_a, meta, form, h=h)
        row[f"{form}_expand_us"] = graph_us(
            lambda f=form, hp=planes: lora_expand(hp, lora_b, out, offsets, meta, f), warmup, rep
        )
        row[f"{form}_us"] = graph_us(
            lambda f=form: add_lora(x, lora_a, lora_b, out, offsets, meta, form=f, h=h),
            warmup,
            rep,
        )
    row.update(fold_case(x, w, lora_a, lora_b, offsets, meta, token_slots, warmup, rep))
    row["auto_us"] = row[f"{row['auto_form']}_us"]
    row["lora_vs_base"] = row["auto_us"] / row["base_us"]
    row["eager_us"] = 1e3 * bench_ms(
        lambda: add_lora(x, lora_a, lora_b, out, offsets, meta, h=h), warmup, rep
    )
    row["torch_us"] = 1e3 * bench_ms(
        lambda: add_lora(x, lora_a, lora_b, out, offsets, meta, backend="torch"), warmup, rep
    )
    return row


def fold_case(
    x: torch.Tensor,
    w: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    offsets: list[int],
    meta,
    token_slots: list[int],
    warmup: int,
    rep: int,
) -> dict:
    """Times of the folded shrink (see the module docstring), after checking that it
    gives base + add_lora's output."""
    num_slots, n_slices, r_max, _ = lora_a.shape
    total_out, width = w.shape[0], n_slices * r_max
    folded = torch.cat([w, lora_a.flatten(0, 2)])  # [total_out + S * n * r_max, in]
    full = torch.empty(x.shape[0], folded.shape[0], device=x.device, dtype=x.dtype)
    out = full[:, :total_out]

    def plane(columns: torch.Tensor) -> torch.Tensor:  # [T, n * r_max] -> [1, T, n, r_max]
        return columns.unflatten(1, (n_slices, r_max)).unsqueeze(0)

    torch.mm(x, folded.t(), out=full)
    starts = total_out + width * torch.tensor(token_slots, device=x.device)
    own = full.gather(1, starts[:, None] + torch.arange(width, device=x.device))
    expected = torch.mm(x, w.t())
    add_lora(x, lora_a, lora_b, expected, offsets, meta, form="bgmv")
    lora_expand(plane(own), lora_b, out, offsets, meta, "bgmv")
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)

    first = plane(full[:, total_out : total_out + width])

    def fold() -> None:
        torch.mm(x, folded.t(), out=full)
        lora_expand(first, lora_b, out, offsets, meta, "bgmv")

    return {
        "fold_slots": num_slots,
        "fold_gemm_us": graph_us(lambda: torch.mm(x, folded.t(), out=full), warmup, rep),
        "fold_us": graph_us(fold, warmup, rep),
    }


def print_table(rows: list[dict]) -> None:
    cols = [
        ("scenario", "scenario", "{:>8}"), ("group", "group", "{:>7}"),
        ("base_us", "base", "{:>7.1f}"), ("base_floor_us", "base_flr", "{:>8.1f}"),
        ("sgmv_us", "sgmv", "{:>7.1f}"), ("bgmv_us", "bgmv", "{:>7.1f}"),
        ("auto_form", "auto", "{:>5}"), ("lora_floor_us", "lora_flr", "{:>8.1f}"),
        ("lora_vs_base", "lora/base", "{:>9.2f}"), ("eager_us", "eager", "{:>7.1f}"),
        ("torch_us", "torch", "{:>8.1f}"),
        ("sgmv_shrink_us", "sg_shr", "{:>7.1f}"), ("sgmv_expand_us", "sg_exp", "{:>7.1f}"),
        ("bgmv_shrink_us", "bg_shr", "{:>7.1f}"), ("bgmv_expand_us", "bg_exp", "{:>7.1f}"),
        ("fold_gemm_us", "fold_mm", "{:>7.1f}"), ("fold_us", "fold", "{:>7.1f}"),
    ]  # fmt: skip
    print(" ".join(f"{head:>{len(fmt.format(rows[0][key]))}}" for key, head, fmt in cols))
    for row in rows:
        print(" ".join(fmt.format(row[key]) for key, _, fmt in cols))
    print(
        "microseconds, do_bench median, L2 flushed; device times from CUDA-graph replays, "
        "eager = direct add_lora call (host overhead included); floors: bytes at 4.2 TB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--r-max", type=int, default=16, help="pool rank padding (>= --rank)")
    parser.add_argument("--scenarios", nargs="+", default=["decode", "prefill"])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS))
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lora_kernels needs a CUDA device")
    import triton

    rows = [
        run_case(s, g, args.rank, args.r_max, args.warmup, args.rep)
        for s in args.scenarios
        for g in args.groups
    ]
    print_table(rows)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
