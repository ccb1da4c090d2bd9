"""Issue 3's correctness check on a GPU: five different PEFT adapters plus base-model
rows served in one batch by the engine in bfloat16 (Triton LoRA kernels), against
transformers + peft in float32, each adapter alone.

    LORAPLEX_TEST_TOKENIZER_DIR=<SmolLM2 tokenizer files> \
        python bench/adapter_accuracy_gpu.py --out accuracy.json

Reports, per adapter, the max |logit error| over every prompt position of a mixed
prefill batch (engine model + MultiLoraApplier vs peft), and greedy token agreement of
32-token generations streamed concurrently through the engine's gRPC server.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.attention import AttentionMetadata  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.lora.applier import MultiLoraApplier  # noqa: E402
from engine.lora.peft_format import load_adapter  # noqa: E402
from engine.lora.slot_pool import LoraSlotPool  # noqa: E402
from engine.model.loader import load_model  # noqa: E402
from loraplex.v1 import inference_pb2  # noqa: E402
from tests.adapter_factory import make_peft_adapter  # noqa: E402
from tests.engine.test_adapter_serving import ADAPTERS  # noqa: E402
from tests.engine_server import running_engine  # noqa: E402
from tests.hf_reference import hf_greedy, hf_model  # noqa: E402
from tests.model_factory import make_tiny_model  # noqa: E402

PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 2, 77, 9, 1000, 2000],
    [1, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53],
    [1, 7, 300, 3000, 30000, 12, 99, 5, 61],
]
NEW_TOKENS = 32
SIZES = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2)


def logit_errors(model_dir: Path, adapter_root: Path, dtype: torch.dtype) -> dict[str, float]:
    """Max |engine logits - peft fp32 logits| over all positions, per adapter."""
    names = ["", *ADAPTERS]
    model = load_model(model_dir, dtype=dtype, device="cuda")
    pool = LoraSlotPool(model.config, len(ADAPTERS), 16, dtype, "cuda")
    for slot, name in enumerate(ADAPTERS):
        pool.load_into_slot(slot, load_adapter(adapter_root / name, model.config, 16))
    pool.wait_pending()
    rows = [(name, p) for name in names for p in PROMPTS]
    cache = KVCache(model.config, 256, 16, dtype, "cuda")
    tables, next_block, ids, slots = [], 0, [], []
    for name, prompt in rows:
        n = -(-len(prompt) // 16)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
        ids.extend(prompt)
        slots.extend([names.index(name) - 1] * len(prompt))
    lens = [len(p) for _, p in rows]
    meta = AttentionMetadata.build(lens, lens, tables, 16, "cuda")
    logits = model(
        torch.tensor(ids, device="cuda"),
        meta.positions,
        meta,
        cache,
        MultiLoraApplier(pool, slots, "triton"),
        torch.arange(len(ids), device="cuda"),
    )
    errors: dict[str, float] = {}
    start = 0
    for name, prompt in rows:
        reference = hf_model(model_dir, adapter_root / name if name else None).to("cuda")
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([prompt], device="cuda")).logits[0]
        got = logits[start : start + len(prompt)]
        start += len(prompt)
        key = name or "base"
        errors[key] = max(errors.get(key, 0.0), float((got - expected).abs().max()))
        reference.to("cpu")
    return errors


def engine_tokens(model_dir: Path, adapter_root: Path, dtype: str) -> dict:
    """Greedy tokens of every (adapter, prompt) row, all streamed concurrently."""
    config = EngineConfig(
        model_path=model_dir,
        device="cuda",
        dtype=dtype,
        port=0,
        max_loras=8,
        max_lora_rank=16,
        adapter_dir=adapter_root,
        gpu_memory_fraction=0.2,
    )
    jobs = [(name, i) for name in ["", *ADAPTERS] for i in range(len(PROMPTS))]
    got: dict[tuple[str, int], list[int]] = {}
    with running_engine(config) as running:

        def run(job):
            name, i = job
            got[job] = running.generate(
                inference_pb2.GenerateRequest(
                    adapter=name,
                    token_ids=inference_pb2.TokenIds(ids=PROMPTS[i]),
                    sampling=inference_pb2.SamplingParams(
                        max_new_tokens=NEW_TOKENS, ignore_eos=True
                    ),
                )
            ).token_ids

        threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return got


def peft_tokens(model_dir: Path, adapter_root: Path, dtype: torch.dtype) -> dict:
    got = {}
    for name in ["", *ADAPTERS]:
        # A copy: the cached float32 model must not be rounded to bf16 in place.
        model = copy.deepcopy(hf_model(model_dir, adapter_root / name if name else None))
        model.to("cuda", dtype)
        for i, prompt in enumerate(PROMPTS):
            got[(name, i)] = hf_greedy(model, prompt, NEW_TOKENS)
        del model
    return got


def agreement(got: dict, expected: dict) -> dict[str, dict[str, float]]:
    """Per adapter: share of equal tokens, and the shortest identical prefix."""
    report: dict[str, dict[str, float]] = {}
    for name in ["", *ADAPTERS]:
        same, prefix = 0, []
        for i in range(len(PROMPTS)):
            pairs = list(zip(got[(name, i)], expected[(name, i)], strict=True))
            same += sum(a == b for a, b in pairs)
            prefix.append(next((k for k, (a, b) in enumerate(pairs) if a != b), NEW_TOKENS))
        report[name or "base"] = {
            "token_agreement": same / (NEW_TOKENS * len(PROMPTS)),
            "min_identical_prefix": min(prefix),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    model_dir = make_tiny_model("llama31", work / "model", **SIZES)
    adapter_root = work / "adapters"
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        make_peft_adapter(model_dir, adapter_root / name, seed=seed + 1, **options)
    reference = peft_tokens(model_dir, adapter_root, torch.float32)
    result = {
        "model": f"random Llama-3.1-style, 3 layers, {SIZES}",
        "engine": "on CUDA, Triton LoRA kernels, all rows in one mixed batch",
        "reference": "transformers + peft, float32, each adapter alone",
        "max_abs_logit_error_engine_bf16": logit_errors(model_dir, adapter_root, torch.bfloat16),
        "max_abs_logit_error_engine_fp32": logit_errors(model_dir, adapter_root, torch.float32),
        "greedy_32_tokens_engine_bf16": agreement(
            engine_tokens(model_dir, adapter_root, "bfloat16"), reference
        ),
        "greedy_32_tokens_engine_fp32": agreement(
            engine_tokens(model_dir, adapter_root, "float32"), reference
        ),
        # The precision baseline: peft itself in bf16 against peft in fp32.
        "greedy_32_tokens_peft_bf16": agreement(
            peft_tokens(model_dir, adapter_root, torch.bfloat16), reference
        ),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
