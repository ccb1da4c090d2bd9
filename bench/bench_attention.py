"""Time prefill / mixed-step attention of one Llama-3.1-8B layer (32 heads, 8 kv heads,
head_dim 128, bf16) on 8,192-token flat batches. GPU only.

    python bench/bench_attention.py --out bench/results/attention_h200.json

Paths, each on the same paged cache (block size 16, shuffled block tables, the new
tokens' k/v already written, so only attention is timed):
- `varlen`: the Triton varlen flash-attention kernel, one launch for the whole batch.
- `per_seq_sdpa`: the old CUDA prefill path, torch_ref's `attend_prefill` (a Python loop
  of SDPA calls, gathering cached context and building a mask per sequence), plus the
  Triton paged-decode kernel for the decode rows of a mixed step.
- `torch_flash`: torch's own SDPA FlashAttention kernel on the dense, cache-free cases
  (equal lengths, no prefix; K/V pre-expanded to 32 heads): the speed to aim for.

Each is checked against a float32 torch reference in the same run (max abs error,
bf16 tolerance 2e-2), and timed with `triton.testing.do_bench` (median, L2 flushed).
TFLOP/s counts 4 * heads * head_dim flops per (query, attended key) pair. The last
table times `AttentionMetadata.build` on the host for each layout.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.attention import AttentionMetadata, attend_torch, write_kv  # noqa: E402
from engine.attention.torch_ref import attend_prefill  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
TOLERANCE = 2e-2
# name -> (cached prefix, new tokens) per sequence; every batch has 8,192 prefill tokens.
CASES: dict[str, list[tuple[int, int]]] = {
    "64x128": [(0, 128)] * 64,
    "16x512": [(0, 512)] * 16,
    "2x4096": [(0, 4096)] * 2,
    "8x512 +3584 cached": [(3584, 512)] * 8,
    "mixed 8192 + 128 decodes @2048": [(0, 4096)] * 2 + [(2047, 1)] * 128,
}


def make_case(seqs: list[tuple[int, int]], seed: int = 0) -> dict:
    """A cache holding every sequence's context (tables shuffled), q/k/v, metadata."""
    contexts = [p + n for p, n in seqs]
    num_blocks = sum(-(-c // BLOCK_SIZE) for c in contexts) + 1
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    tables = [[order.pop() for _ in range(-(-c // BLOCK_SIZE))] for c in contexts]
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    meta = AttentionMetadata.build([n for _, n in seqs], contexts, tables, BLOCK_SIZE, "cuda")
    kv_layer = randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    q = randn(meta.num_tokens, HEADS, HEAD_DIM)
    k, v = randn(meta.num_tokens, KV_HEADS, HEAD_DIM), randn(meta.num_tokens, KV_HEADS, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    # float32 reference (it writes the new k/v into its own float copy of the cache).
    expected = attend_torch(q.float(), k.float(), v.float(), kv_layer.float(), meta, scale)
    write_kv(kv_layer, k, v, meta.slot_mapping)
    return {
        "seqs": seqs,
        "meta": meta,
        "q": q,
        "k": k,
        "v": v,
        "kv": kv_layer,
        "scale": scale,
        "expected": expected,
        "tables": tables,
    }


def attention_flops(seqs: list[tuple[int, int]]) -> float:
    """4 * H * D per (query, key) pair: QK^T and PV, 2 flops per multiply-add."""
    pairs = sum(n * p + n * (n + 1) // 2 for p, n in seqs)
    return 4.0 * HEADS * HEAD_DIM * pairs


def varlen_path(case: dict) -> Callable[[], torch.Tensor]:
    from engine.attention.triton_prefill import varlen_paged_attention

    meta, out = case["meta"], torch.empty_like(case["q"])
    return lambda: varlen_paged_attention(
        case["q"],
        case["kv"],
        meta.block_tables,
        meta.query_start_loc_tensor,
        meta.context_lens_tensor,
        case["scale"],
        out=out,
    )


def per_seq_sdpa_path(case: dict) -> Callable[[], torch.Tensor]:
    """The CUDA backend as it was: per-sequence SDPA prefill, Triton decode rows."""
    from engine.attention.triton_decode import paged_decode_attention

    meta, q, out = case["meta"], case["q"], torch.empty_like(case["q"])

    def run() -> torch.Tensor:
        attend_prefill(q, case["k"], case["v"], case["kv"], meta, case["scale"], out)
        if meta.decode_seqs:
            decoded = paged_decode_attention(
                q.index_select(0, meta.decode_token_index),
                case["kv"],
                meta.decode_block_tables,
                meta.decode_context_lens,
                case["scale"],
                meta.max_context_len,
            )
            out.index_copy_(0, meta.decode_token_index, decoded)
        return out

    return run


def torch_flash_path(case: dict) -> Callable[[], torch.Tensor] | None:
    """torch's FlashAttention on `[B, H, L, D]`, for equal-length cache-free batches only."""
    seqs = case["seqs"]
    if any(p for p, _ in seqs) or len({n for _, n in seqs}) != 1:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, length = len(seqs), seqs[0][1]

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # [T, h, D] -> [B, H, L, D]
        x = x.view(batch, length, x.shape[1], HEAD_DIM).transpose(1, 2)
        return x.repeat_interleave(HEADS // x.shape[1], dim=1)  # GQA expanded up front

    q = heads_first(case["q"])
    k, v = heads_first(case["k"]).contiguous(), heads_first(case["v"]).contiguous()

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=case["scale"])
        return out.transpose(1, 2).reshape(-1, HEADS, HEAD_DIM)  # [T, H, D]

    return run


def measure(name: str, fn: Callable[[], torch.Tensor], case: dict, flops: float) -> dict:
    import triton.testing

    error = (fn().float() - case["expected"]).abs().max().item()
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return {
        "path": name,
        "ms": ms,
        "tflops": flops / (ms * 1e-3) / 1e12,
        "max_abs_err": error,
        "correct": error <= TOLERANCE,
    }


def time_metadata_build(case: dict, repeats: int = 50) -> float:
    """Median host milliseconds of `AttentionMetadata.build` for this layout on CUDA."""
    seqs = case["seqs"]
    args = ([n for _, n in seqs], [p + n for p, n in seqs], case["tables"], BLOCK_SIZE, "cuda")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        AttentionMetadata.build(*args)
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/attention.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA device")

    rows, builds = [], []
    for case_name, seqs in CASES.items():
        case = make_case(seqs)
        flops = attention_flops(seqs)
        paths = {"varlen": varlen_path(case), "per_seq_sdpa": per_seq_sdpa_path(case)}
        flash = torch_flash_path(case)
        if flash is not None:
            paths["torch_flash"] = flash
        for path_name, fn in paths.items():
            rows.append({"case": case_name, **measure(path_name, fn, case, flops)})
        builds.append({"case": case_name, "build_ms": time_metadata_build(case)})
        del case
        torch.cuda.empty_cache()

    print(f"{'case':<32} {'path':<14} {'ms':>9} {'TFLOP/s':>9} {'max err':>9}  ok")
    for r in rows:
        print(
            f"{r['case']:<32} {r['path']:<14} {r['ms']:>9.3f} {r['tflops']:>9.1f}"
            f" {r['max_abs_err']:>9.2e}  {'yes' if r['correct'] else 'NO'}"
        )
    print(f"\n{'case':<32} {'metadata build ms (host)':>24}")
    for b in builds:
        print(f"{b['case']:<32} {b['build_ms']:>24.3f}")

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bf16"},
        "block_size": BLOCK_SIZE,
        "results": rows,
        "metadata_build": builds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if not all(r["correct"] for r in rows):
        sys.exit("some path disagrees with the float32 reference")


if __name__ == "__main__":
    main()
