"""Load a Hugging Face safetensors checkpoint into `LlamaModel`.

Checkpoint tensors are copied straight into slices of the fused parameters (q/k/v rows
of `qkv_proj`, gate/up rows of `gate_up_proj`), converting dtype on the way, so peak
memory stays one model plus one tensor. Every problem is a ModelFormatError naming the
file or tensor at fault. Which files a folder holds, and the header-only fingerprint,
are in the torch-free `engine.formats.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from engine.attention import AttentionBackend
from engine.formats.checkpoint import checkpoint_files
from engine.model.config import ModelFormatError, load_model_config
from engine.model.llama import LlamaModel

# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    folder: Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attend: AttentionBackend | None = None,
    fused_ops: bool | None = None,
    fold_rank: int = 0,
) -> LlamaModel:
    """Parse `folder/config.json`, build the model on `device` and load its weights.
    `attend`, `fused_ops` and `fold_rank` as in `LlamaModel` (None: the best for
    `device`)."""
    config = load_model_config(Path(folder))
    model = LlamaModel(
        config, dtype=dtype, device=device, attend=attend, fused_ops=fused_ops, fold_rank=fold_rank
    )
    load_weights(model, Path(folder))
    return model.eval()


def load_weights(model: LlamaModel, folder: Path) -> None:
    """Fill every parameter of `model` from the checkpoint in `folder`.

    Raises ModelFormatError for a missing, unexpected or wrongly shaped tensor.
    """
    destinations = _destinations(model)
    loaded: set[str] = set()
    for path in checkpoint_files(folder):
        with _open_safetensors(path) as reader:
            for name in reader.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and model.lm_head is None:
                    continue  # tied: the head is embed_tokens, a saved copy is redundant
                target = destinations.get(name)
                if target is None:
                    raise ModelFormatError(
                        f"{path.name}: unexpected tensor {name!r}; the config "
                        f"({model.config.architecture}) has no place for it"
                    )
                shape = tuple(reader.get_slice(name).get_shape())
                if shape != tuple(target.shape):
                    raise ModelFormatError(
                        f"{path.name}: tensor {name!r} has shape {list(shape)}, "
                        f"expected {list(target.shape)} from config.json"
                    )
                target.copy_(reader.get_tensor(name))
                loaded.add(name)
    missing = sorted(set(destinations) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(f"{folder}: checkpoint is missing tensor {missing[0]!r}{more}")


def _destinations(model: LlamaModel) -> dict[str, Tensor]:
    """Checkpoint tensor name -> the (slice of the) parameter it fills."""
    config = model.config
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    out: dict[str, Tensor] = {
        "model.embed_tokens.weight": model.embed_tokens.data,
        "model.norm.weight": model.norm.data,
    }
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.data
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}."
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        qkv_rows = {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv)}
        for proj, (start, rows) in qkv_rows.items():
            out[f"{attn}{proj}.weight"] = layer.qkv_proj.data.narrow(0, start, rows)
            if layer.qkv_bias is not None:
                out[f"{attn}{proj}.bias"] = layer.qkv_bias.data.narrow(0, start, rows)
        out[attn + "o_proj.weight"] = layer.o_proj.data
        if layer.o_bias is not None:
            out[attn + "o_proj.bias"] = layer.o_bias.data
        out[mlp + "gate_proj.weight"] = layer.gate_up_proj.data.narrow(0, 0, inter)
        out[mlp + "up_proj.weight"] = layer.gate_up_proj.data.narrow(0, inter, inter)
        out[mlp + "down_proj.weight"] = layer.down_proj.data
        out[prefix + "input_layernorm.weight"] = layer.input_norm.data
        out[prefix + "post_attention_layernorm.weight"] = layer.post_attention_norm.data
    return out


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise ModelFormatError(f"{path.name} is not a readable safetensors file: {exc}") from exc
