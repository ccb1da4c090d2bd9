"""Seeded fixtures for the serving benchmark: a random-weight Llama folder the engine
loads (config.json, safetensors shards + index, a tokenizer covering every id) and
PEFT LoRA adapters on all seven projections, one folder per adapter id.

Weights are drawn straight into tensors (on the GPU when there is one) and written with
safetensors; no transformers or PEFT model object is ever built, so the 8B shape takes
seconds of compute and the rest is disk. Everything lands in `<work_dir>/fixtures-*`
with a `spec.json` marker written last: a folder whose marker equals the wanted spec
is reused as is.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from serving_spec import ModelSpec, Preset, adapter_ids, fixture_spec

WEIGHT_STD = 0.02
# Each adapter's delta is about this fraction of its base projection's output, so that
# adapters visibly change greedy outputs without swamping the base model.
ADAPTER_STRENGTH = 0.2
LORA_ALPHA = 32
_MAX_PENDING_WRITES = 3  # shards moved to host memory but not yet on disk
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_PARENT = {
    proj: "self_attn" if proj in _ATTENTION else "mlp"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
}


def ensure_fixtures(preset: Preset, work_dir: Path, seed: int, log: Any = print) -> dict:
    """Model and adapter folders for `preset`, built unless a matching marker exists.
    Returns {"model_dir", "adapter_dir", "reused", "build_s"}."""
    spec = fixture_spec(preset, seed)
    root = Path(work_dir) / f"fixtures-{preset.name}-seed{seed}"
    marker = root / "spec.json"
    model_dir, adapter_dir = root / "model", root / "adapters"
    out = {"model_dir": str(model_dir), "adapter_dir": str(adapter_dir)}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        log(f"fixtures: reusing {root}")
        return {**out, "reused": True, "build_s": 0.0}
    start = time.monotonic()
    if root.exists():
        shutil.rmtree(root)
    model_dir.mkdir(parents=True)
    device = "cuda" if preset.device == "cuda" and torch.cuda.is_available() else "cpu"
    with ThreadPoolExecutor(max_workers=8) as writers:
        write_model_config(preset.model, model_dir)
        write_tokenizer(preset.model, model_dir)
        write_model_weights(preset.model, model_dir, preset.num_shards, seed, device, writers, log)
        log(f"fixtures: model written ({time.monotonic() - start:.1f} s)")
        write_adapters(preset, adapter_dir, seed, device, writers)
    log(f"fixtures: {preset.num_adapters} adapters written ({time.monotonic() - start:.1f} s)")
    marker.write_text(json.dumps(spec, indent=1))
    return {**out, "reused": False, "build_s": time.monotonic() - start}


def write_model_config(spec: ModelSpec, folder: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def write_tokenizer(spec: ModelSpec, folder: Path) -> None:
    """A WordLevel tokenizer: id i is the word `w<i>` (two ids are BOS/EOS specials), so
    every id decodes to some text. Prompts are sent as token ids; text only has to exist."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    vocab = {f"w{i}": i for i in range(spec.vocab_size)}
    vocab[bos] = spec.bos_token_id
    vocab[eos] = spec.eos_token_id
    del vocab[f"w{spec.bos_token_id}"], vocab[f"w{spec.eos_token_id}"]
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"w{_unk_id(spec)}"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([bos, eos])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def _unk_id(spec: ModelSpec) -> int:
    return 0 if spec.bos_token_id != 0 and spec.eos_token_id != 0 else 3


def write_model_weights(
    spec: ModelSpec,
    folder: Path,
    num_shards: int,
    seed: int,
    device: str,
    writers: ThreadPoolExecutor,
    log: Any,
) -> None:
    """Transformers' LlamaForCausalLM tensor names, layers split over `num_shards` files
    (embedding in the first, norm and lm_head in the last) plus the index file."""
    gen = torch.Generator(device=device).manual_seed(seed)
    per_shard = math.ceil(spec.num_layers / num_shards)
    layer_groups = [
        list(range(start, min(start + per_shard, spec.num_layers)))
        for start in range(0, spec.num_layers, per_shard)
    ]
    weight_map: dict[str, str] = {}
    pending = []
    total_bytes = 0
    for shard, layers in enumerate(layer_groups):
        name = f"model-{shard + 1:05d}-of-{len(layer_groups):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        if shard == 0:
            tensors["model.embed_tokens.weight"] = _normal(
                (spec.vocab_size, spec.hidden_size), WEIGHT_STD, gen, device
            )
        for layer in layers:
            tensors.update(_layer_tensors(spec, layer, gen, device))
        if shard == len(layer_groups) - 1:
            tensors["model.norm.weight"] = torch.ones(spec.hidden_size, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = _normal(
                (spec.vocab_size, spec.hidden_size), WEIGHT_STD, gen, device
            )
        weight_map.update({key: name for key in tensors})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        while len(pending) >= _MAX_PENDING_WRITES:
            pending.pop(0).result()
        pending.append(writers.submit(save_file, tensors, str(folder / name)))
        log(f"fixtures: shard {shard + 1}/{len(layer_groups)} made, writing")
    for future in pending:
        future.result()
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _layer_tensors(
    spec: ModelSpec, layer: int, gen: torch.Generator, device: str
) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}."
    out = {
        f"{prefix}{_PARENT[proj]}.{proj}.weight": _normal(shape, WEIGHT_STD, gen, device)
        for proj, shape in spec.projection_shapes().items()
    }
    ones = torch.ones(spec.hidden_size, dtype=torch.bfloat16)
    out[prefix + "input_layernorm.weight"] = ones
    out[prefix + "post_attention_layernorm.weight"] = ones.clone()
    return out


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator, device: str) -> torch.Tensor:
    """N(0, std) in bf16, made on `device`, returned in (contiguous) host memory."""
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std)
    return t.to(torch.bfloat16).cpu()


def write_adapters(
    preset: Preset, adapter_dir: Path, seed: int, device: str, writers: ThreadPoolExecutor
) -> None:
    """`preset.num_adapters` PEFT folders `a000`.. with random A ~ N(0, 1/in) and B sized
    so each delta is ADAPTER_STRENGTH of its base projection's output (B is nonzero)."""
    spec, rank = preset.model, preset.lora_rank
    scaling = LORA_ALPHA / rank
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "target_modules": list(spec.projection_shapes()),
        "base_model_name_or_path": "loraplex-bench",
        "inference_mode": True,
    }
    pending = []
    for adapter_id in adapter_ids(preset.num_adapters):
        folder = adapter_dir / adapter_id
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
        tensors: dict[str, torch.Tensor] = {}
        for layer in range(spec.num_layers):
            for proj, (out_f, in_f) in spec.projection_shapes().items():
                key = f"base_model.model.model.layers.{layer}.{_PARENT[proj]}.{proj}"
                b_std = ADAPTER_STRENGTH * WEIGHT_STD * math.sqrt(in_f / rank) / scaling
                tensors[f"{key}.lora_A.weight"] = _normal(
                    (rank, in_f), 1 / math.sqrt(in_f), gen, device
                )
                tensors[f"{key}.lora_B.weight"] = _normal((out_f, rank), b_std, gen, device)
        while len(pending) >= 16:
            pending.pop(0).result()
        pending.append(
            writers.submit(save_file, tensors, str(folder / "adapter_model.safetensors"))
        )
    for future in pending:
        future.result()
