"""Time one engine decode step of a Llama-3.1-8B-shaped model, base vs many adapters,
eager vs CUDA graphs, torch-reference vs Triton paged attention. GPU only.

    python bench/bench_decode_step.py --out bench/results/decode_step.json

The model is our `LlamaModel` with random bf16 weights made on the GPU (no files),
32 decode sequences with ~512 cached tokens each (random K/V, no prefill), and a
`LoraSlotPool` of 32 rank-16 adapters on all seven projections (random A/B written
straight into the pool). A step is `ModelRunner.execute` on a `ScheduledBatch`
(host-side batch building, the forward, greedy sampling), timed with CUDA events;
the median of `--steps` runs after `--warmup`. Every step rewrites the same cache
slot, so the context stays the same length.

Scenarios: base (no adapters), distinct (one adapter per row), shared (every row the
same adapter). Modes: eager with the torch-reference attention, eager with the
Triton decode attention, and a replayed CUDA graph (Triton attention). The floor is
the bytes a step must read at 4.2 TB/s: every weight but the embedding table (only B
rows of it), the K/V of every context, and each distinct active adapter's A and B.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.attention.torch_ref import attend_torch  # noqa: E402
from engine.cuda_graphs import DecodeGraphs  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.lora.slot_pool import GROUPS, LoraSlotPool  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.llama import LlamaModel  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.scheduler import ScheduledBatch, ScheduledSeq  # noqa: E402

HBM_BYTES_PER_S = 4.2e12
BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048
LLAMA_31_8B = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
    name="llama-3.1-8b-shaped-random",
)


def build(batch: int, context: int, rank: int) -> tuple[LlamaModel, KVCache, LoraSlotPool, int]:
    """Random model, a filled KV cache (last block = graph padding), a full slot pool."""
    from engine.attention.triton_backend import attend_triton

    config = LLAMA_31_8B
    model = LlamaModel(
        config, dtype=torch.bfloat16, device="cuda", attend=attend_triton, fold_rank=rank
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    blocks_per_seq = -(-(context + 1) // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    cache = KVCache(config, num_blocks, BLOCK_SIZE, torch.bfloat16, "cuda")
    for layer in cache.layers:
        layer.normal_(0.0, 1.0, generator=gen)
    pool = LoraSlotPool(config, max_loras=batch, max_rank=rank, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for group in GROUPS:
            pool.lora_a[group].normal_(0.0, 0.02, generator=gen)
            pool.lora_b[group].normal_(0.0, 0.02, generator=gen)
    pool.slot_ranks.fill_(rank)
    return model, cache, pool, blocks_per_seq


def make_batch(slots: list[int], context: int, blocks_per_seq: int) -> ScheduledBatch:
    """Decode rows at position `context` over shuffled blocks (never the last one)."""
    order = torch.randperm(len(slots) * blocks_per_seq, generator=torch.Generator().manual_seed(1))
    tables = order.view(len(slots), blocks_per_seq).tolist()
    seqs = tuple(
        ScheduledSeq(f"r{i}", (1000 + i,), context, tuple(tables[i]), slot, needs_logits=True)
        for i, slot in enumerate(slots)
    )
    return ScheduledBatch(seqs, (), ())


def time_steps(runner: ModelRunner, batch: ScheduledBatch, warmup: int, steps: int) -> list[float]:
    params = [SamplingParams(temperature=0.0)] * len(batch.seqs)
    generators = [torch.Generator() for _ in batch.seqs]
    for _ in range(warmup):
        runner.execute(batch, params, generators)
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.execute(batch, params, generators)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def floor_bytes(
    model: LlamaModel, pool: LoraSlotPool, batch: int, context: int, adapters: int
) -> dict[str, int]:
    config = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    embed = model.embed_tokens
    weights -= embed.numel() * embed.element_size() - batch * config.hidden_size * 2
    kv = batch * (context + 1) * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    per_adapter = sum(
        (pool.lora_a[g][:, 0].numel() + pool.lora_b[g][:, 0].numel()) * 2 for g in GROUPS
    )
    return {"weights": weights, "kv": kv, "adapters": adapters * per_adapter}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, cache, pool, blocks_per_seq = build(args.batch, args.context, args.rank)
    print(f"built model, cache, pool in {time.perf_counter() - t0:.1f} s", flush=True)
    scenarios = {
        "base": [-1] * args.batch,
        "distinct": list(range(args.batch)),
        "shared": [0] * args.batch,
    }
    distinct_adapters = {"base": 0, "distinct": args.batch, "shared": 1}
    graphs = DecodeGraphs(
        model,
        cache,
        pool,
        max_num_seqs=args.batch,
        max_model_len=MAX_MODEL_LEN,
        pad_block=cache.num_blocks - 1,
    )
    capture_s = graphs.capture(sizes=[args.batch])
    print(f"captured {len(graphs.captured)} graphs (bucket {args.batch}) in {capture_s:.1f} s")
    from engine.attention.triton_backend import attend_triton

    modes = {
        "eager_torch_attn": (ModelRunner(model, cache, pool, "triton"), attend_torch),
        "eager_triton_attn": (ModelRunner(model, cache, pool, "triton"), attend_triton),
        "cuda_graph": (ModelRunner(model, cache, pool, "triton", graphs), attend_triton),
    }
    results = []
    for scenario, slots in scenarios.items():
        batch = make_batch(slots, args.context, blocks_per_seq)
        parts = floor_bytes(model, pool, args.batch, args.context, distinct_adapters[scenario])
        floor_ms = sum(parts.values()) / HBM_BYTES_PER_S * 1e3
        for mode, (runner, attend) in modes.items():
            model.attend = attend
            replays = graphs.num_replays
            times = time_steps(runner, batch, args.warmup, args.steps)
            if mode == "cuda_graph":
                assert graphs.num_replays - replays == args.warmup + args.steps, "graph not used"
            median = statistics.median(times)
            results.append(
                {
                    "scenario": scenario,
                    "mode": mode,
                    "median_ms": median,
                    "min_ms": min(times),
                    "max_ms": max(times),
                    "floor_ms": floor_ms,
                    "ratio_to_floor": median / floor_ms,
                    "floor_bytes": parts,
                }
            )
    model.attend = attend_triton
    by_key = {(r["scenario"], r["mode"]): r["median_ms"] for r in results}
    ratios = {
        f"{scenario}/base {mode}": by_key[(scenario, mode)] / by_key[("base", mode)]
        for scenario in ("distinct", "shared")
        for mode in modes
    }
    print(f"\n{'scenario':<9} {'mode':<18} {'median ms':>10} {'floor ms':>9} {'x floor':>8}")
    for r in results:
        print(
            f"{r['scenario']:<9} {r['mode']:<18} {r['median_ms']:>10.3f} "
            f"{r['floor_ms']:>9.3f} {r['ratio_to_floor']:>8.2f}"
        )
    print()
    for name, value in ratios.items():
        print(f"{name:<40} {value:.3f}")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "batch": args.batch,
            "context": args.context,
            "rank": args.rank,
            "steps": args.steps,
            "hbm_bytes_per_s": HBM_BYTES_PER_S,
            "capture_s": capture_s,
            "results": results,
            "ratios": ratios,
        }
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
