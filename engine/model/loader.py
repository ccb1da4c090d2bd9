"""Load a Hugging Face safetensors checkpoint into `LlamaModel`, and fingerprint it.

Checkpoint tensors are copied straight into slices of the fused parameters (q/k/v rows
of `qkv_proj`, gate/up rows of `gate_up_proj`), converting dtype on the way, so peak
memory stays one model plus one tensor. Every problem is a ModelFormatError naming the
file or tensor at fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from engine.attention import AttentionBackend
from engine.model.config import ModelConfig, ModelFormatError, load_model_config
from engine.model.llama import LlamaModel

INDEX_FILE = "model.safetensors.index.json"
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Bytes of each tensor's data that enter the fingerprint: enough to tell fine-tunes of
# one architecture apart without reading gigabytes.
_FINGERPRINT_SAMPLE_BYTES = 4096


def load_model(
    folder: Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attend: AttentionBackend | None = None,
    fused_ops: bool | None = None,
) -> LlamaModel:
    """Parse `folder/config.json`, build the model on `device` and load its weights.
    `attend` and `fused_ops` as in `LlamaModel` (None: the best for `device`)."""
    config = load_model_config(Path(folder))
    model = LlamaModel(config, dtype=dtype, device=device, attend=attend, fused_ops=fused_ops)
    load_weights(model, Path(folder))
    return model.eval()


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of `folder`: those its index names, else every `*.safetensors`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"model folder {folder} does not exist")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise ModelFormatError(f"{INDEX_FILE} names shard {path.name}, which is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        if not path.is_file():  # a FIFO or a device would block the read or never end
            raise ModelFormatError(f"{path} is not a regular file; weight files must be")
    if files:
        return files
    other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    if other:
        raise ModelFormatError(
            f"{folder} has no *.safetensors weights, only {', '.join(other[:3])}; "
            "convert it with transformers' save_pretrained(..., safe_serialization=True)"
        )
    raise ModelFormatError(f"{folder} has no *.safetensors weight files")


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


def model_fingerprint(config: ModelConfig, folder: Path) -> str:
    """A sha256 hex identifying the base model, independent of where it is stored.

    Covers the architecture (every ModelConfig field but the folder name), and each
    checkpoint tensor's name, dtype, shape and first bytes of data, sorted by name, read
    from safetensors headers without loading weights. Copies hash equal; sharding the
    same tensors differently does not change it.
    """
    architecture = {k: v for k, v in dataclasses.asdict(config).items() if k != "name"}
    tensors: dict[str, list[Any]] = {}
    for path in checkpoint_files(folder):
        with path.open("rb") as handle:
            header, data_start = _read_header(handle, path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                handle.seek(data_start + begin)
                sample = handle.read(min(end - begin, _FINGERPRINT_SAMPLE_BYTES))
                sample_hash = hashlib.sha256(sample).hexdigest()
                tensors[name] = [info["dtype"], list(info["shape"]), sample_hash]
    payload = json.dumps(
        {"architecture": architecture, "tensors": sorted(tensors.items())}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise ModelFormatError(f"{path.name} is not a readable safetensors file: {exc}") from exc


def _read_header(handle: Any, path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the file offset where tensor data begins."""
    raw_len = handle.read(8)
    if len(raw_len) != 8:
        raise ModelFormatError(f"{path.name} is not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > 100 * 1024 * 1024:
        raise ModelFormatError(f"{path.name} is not a safetensors file (header too large)")
    try:
        header = json.loads(handle.read(header_len))
    except ValueError as exc:
        raise ModelFormatError(f"{path.name} has an unreadable safetensors header") from exc
    return header, 8 + header_len
