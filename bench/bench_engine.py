"""Output tokens/s of the loraplex engine (over real gRPC) against transformers'
`generate`, same model, same machine, run side by side.

    python bench/bench_engine.py --model default --device cpu --new-tokens 64 \
        --out bench/results/engine_vs_transformers_cpu.json

Single stream: one request at a time. Batch 8: eight concurrent streams (engine) vs
one `generate` call on a left-padded batch of eight (transformers). Greedy, EOS ignored,
so both produce exactly new_tokens per sequence.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig, resolve_device, resolve_dtype  # noqa: E402
from engine.model.default_model import resolve_model_path  # noqa: E402
from loraplex.environment import cache_dir  # noqa: E402
from loraplex.v1 import inference_pb2  # noqa: E402
from tests.engine_server import running_engine  # noqa: E402

PROMPTS = [
    "Explain how a bicycle stays upright.",
    "Write a short poem about autumn leaves.",
    "What are the main causes of inflation?",
    "Describe the water cycle for a child.",
    "Give three tips for writing clean code.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a hash map work?",
]


def engine_rate(
    config: EngineConfig, prompts: list[list[int]], new_tokens: int, concurrent: bool
) -> float:
    requests = [
        inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=p),
            sampling=inference_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
        )
        for p in prompts
    ]
    with running_engine(config) as running:
        running.generate(requests[0])  # warm-up
        start = time.perf_counter()
        if concurrent:
            threads = [threading.Thread(target=running.generate, args=(r,)) for r in requests]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for r in requests:
                running.generate(r)
        elapsed = time.perf_counter() - start
    return len(requests) * new_tokens / elapsed


def transformers_rate(
    model_path: Path,
    prompts: list[list[int]],
    new_tokens: int,
    batched: bool,
    device: str,
    dtype: torch.dtype,
) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )

    def run(batch: list[list[int]]) -> None:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, **kwargs)

    run(prompts[:1])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    if batched:
        run(prompts)
    else:
        for p in prompts:
            run([p])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--single-prompts", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype_name = resolve_dtype(args.dtype, device)
    model_path = resolve_model_path(args.model, cache_dir())
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_path)
    prompts = [tokenizer.render_chat([("user", p)]) for p in PROMPTS]
    config = EngineConfig(model_path=model_path, device=device, dtype=dtype_name, port=0)
    dtype = getattr(torch, dtype_name)
    single = prompts[: args.single_prompts]
    rows = {
        "engine_single": engine_rate(config, single, args.new_tokens, concurrent=False),
        "transformers_single": transformers_rate(
            model_path, single, args.new_tokens, False, device, dtype
        ),
        "engine_batch8": engine_rate(config, prompts, args.new_tokens, concurrent=True),
        "transformers_batch8": transformers_rate(
            model_path, prompts, args.new_tokens, True, device, dtype
        ),
    }
    result = {
        "command": " ".join(sys.argv),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, device {device}",
        "model": model_path.name,
        "dtype": dtype_name,
        "new_tokens": args.new_tokens,
        "output_tokens_per_s": {k: round(v, 2) for k, v in rows.items()},
        "ratio_single": round(rows["engine_single"] / rows["transformers_single"], 3),
        "ratio_batch8": round(rows["engine_batch8"] / rows["transformers_batch8"], 3),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
