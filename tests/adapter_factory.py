"""Real PEFT LoRA adapters (and a tiny Llama to put them on) for the tests.

`make_peft_adapter` runs PEFT itself (`LoraConfig` + `get_peft_model` + `save_pretrained`)
on any Hugging Face causal LM folder, so the files are exactly what users bring. PEFT
initialises lora_B to zero (a no-op adapter); we redraw A and B from a seed so that the
adapter's output is a sizeable fraction of each base projection's and greedy outputs
visibly change.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from engine.model.config import ModelConfig


def make_tiny_llama(out_dir: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads,
    intermediate 128, vocab 256; `overrides` change any LlamaConfig field) to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_peft_adapter(
    base_model_dir: Path,
    out_dir: Path,
    *,
    r: int,
    alpha: float,
    target_modules: list[str] | str,
    use_rslora: bool = False,
    layers_to_transform: int | list[int] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int,
    strength: float = 0.5,
    safe_serialization: bool = True,
    **lora_config_kwargs: Any,
) -> Path:
    """Train-free PEFT LoRA adapter for the model in `base_model_dir`, saved to `out_dir`.

    Every LoRA module's delta gets about `strength` times the magnitude of its base
    projection's output (A ~ N(0, 1/in); B sized from the base weight's std and the
    module's own scaling, so rank, alpha and rsLoRA do not change the effect size).
    Extra keyword arguments go to `LoraConfig` (e.g. `use_dora=True` to make a file
    the engine must refuse). Returns `out_dir`.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        layers_to_transform=layers_to_transform,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0,
        **lora_config_kwargs,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(peft_model.named_modules(), key=lambda item: item[0]):
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            lora_a = module.lora_A["default"].weight  # [r, in]
            lora_b = module.lora_B["default"].weight  # [out, r]
            rank, in_features = lora_a.shape
            base_std = float(module.get_base_layer().weight.float().std())
            scaling = float(module.scaling["default"])
            b_std = strength * base_std * math.sqrt(in_features / rank) / scaling
            lora_a.copy_(torch.randn(lora_a.shape, generator=generator) / math.sqrt(in_features))
            lora_b.copy_(torch.randn(lora_b.shape, generator=generator) * b_std)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return out_dir


def write_random_adapter(folder: Path, config: ModelConfig, rank: int, seed: int = 0) -> Path:
    """A PEFT-format rank-`rank` adapter on all seven projections of `config`, bf16,
    written directly (no model needed): for shapes too large to run PEFT on."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from engine.model.config import PROJECTIONS

    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJECTIONS)).save_pretrained(
        folder
    )
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for proj in PROJECTIONS:
            out_features, in_features = config.projection_shape(proj)
            parent = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
            a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            b = torch.randn(out_features, rank, generator=generator) * 0.02
            tensors[f"{name}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{name}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder
