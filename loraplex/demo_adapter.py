"""A small real PEFT LoRA adapter for the default model, written without PEFT, so that
`loraplex up` can show the whole adapter path (register → validate → place → serve)
on a fresh machine. Its weights are small and seeded: answers change, stay readable."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.model.config import load_model_config

RANK = 8
TARGETS = ("q_proj", "v_proj")


def write_demo_adapter(model_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Writes `adapter_config.json` + `adapter_model.safetensors` as PEFT would."""
    config = load_model_config(model_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for projection in TARGETS:
            out_features, in_features = config.projection_shape(projection)
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(RANK, in_features, generator=generator) / in_features**0.5
            )
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(out_features, RANK, generator=generator) * 0.05
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": config.name,
                "r": RANK,
                "lora_alpha": 2 * RANK,
                "target_modules": list(TARGETS),
                "lora_dropout": 0.0,
                "bias": "none",
            },
            indent=2,
        )
    )
    return out_dir
