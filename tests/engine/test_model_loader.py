"""Loading checkpoints: clear errors for unservable folders, sharding, fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.formats.checkpoint import checkpoint_files, model_fingerprint
from engine.kv_cache import KVCache, bytes_per_block, num_blocks_for_bytes
from engine.model.config import ModelFormatError, load_model_config
from engine.model.loader import load_model
from engine.server.app import build_engine


def _copy_with_weights(src: Path, dst: Path, weights: dict[str, torch.Tensor] | None) -> Path:
    """Copy `src` without its weights; write `weights` (if given) as model.safetensors."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    if weights is not None:
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture()
def llama_weights(tiny_llama31_path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_llama31_path / "model.safetensors"))


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_model(tmp_path, dtype=torch.float32)


def test_unsupported_architecture(tiny_llama31_path: Path, tmp_path: Path) -> None:
    folder = _copy_with_weights(tiny_llama31_path, tmp_path / "m", None)
    raw = json.loads((folder / "config.json").read_text())
    raw["architectures"], raw["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFormatError, match="'GPT2LMHeadModel' is not supported"):
        load_model(folder, dtype=torch.float32)


def test_bin_only_folder(tiny_llama31_path: Path, llama_weights, tmp_path: Path) -> None:
    folder = _copy_with_weights(tiny_llama31_path, tmp_path / "m", None)
    torch.save(llama_weights, folder / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match=r"only pytorch_model\.bin.*safe_serialization"):
        load_model(folder, dtype=torch.float32)


def test_no_weights_at_all(tiny_llama31_path: Path, tmp_path: Path) -> None:
    folder = _copy_with_weights(tiny_llama31_path, tmp_path / "m", None)
    with pytest.raises(ModelFormatError, match=r"no \*\.safetensors"):
        load_model(folder, dtype=torch.float32)


def test_missing_tensor(tiny_llama31_path: Path, llama_weights, tmp_path: Path) -> None:
    del llama_weights["model.layers.1.self_attn.k_proj.weight"]
    folder = _copy_with_weights(tiny_llama31_path, tmp_path / "m", llama_weights)
    expected = r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"
    with pytest.raises(ModelFormatError, match=expected):
        load_model(folder, dtype=torch.float32)


def test_untied_model_without_lm_head(tiny_llama31_path: Path, llama_weights, tmp_path) -> None:
    del llama_weights["lm_head.weight"]
    folder = _copy_with_weights(tiny_llama31_path, tmp_path / "m", llama_weights)
    with pytest.raises(ModelFormatError, match="missing tensor 'lm_head.weight'"):
        load_model(folder, dtype=torch.float32)


def test_wrong_shape(tiny_llama31_path: Path, llama_weights, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    llama_weights[name] = llama_weights[name][:100].contiguous()
    folder = _copy_with_weights(tiny_llama31_path, tmp_path / "m", llama_weights)
    expected = r"up_proj\.weight' has shape \[100, 64\], expected \[128, 64\]"
    with pytest.raises(ModelFormatError, match=expected):
        load_model(folder, dtype=torch.float32)


def test_unexpected_tensor(tiny_llama31_path: Path, llama_weights, tmp_path: Path) -> None:
    llama_weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    folder = _copy_with_weights(tiny_llama31_path, tmp_path / "m", llama_weights)
    expected = r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"
    with pytest.raises(ModelFormatError, match=expected):
        load_model(folder, dtype=torch.float32)


def test_sharded_checkpoint_loads_the_same(tiny_qwen2_path: Path, tmp_path: Path) -> None:
    weights = load_file(str(tiny_qwen2_path / "model.safetensors"))
    folder = _copy_with_weights(tiny_qwen2_path, tmp_path / "sharded", None)
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, str(folder / shard))
        weight_map.update(dict.fromkeys(shard_names, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [p.name for p in checkpoint_files(folder)] == sorted(shards)

    whole = load_model(tiny_qwen2_path, dtype=torch.float32)
    sharded = load_model(folder, dtype=torch.float32)
    sharded_state = sharded.state_dict()
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, sharded_state[name]), name
    assert sharded.layers[0].qkv_bias is not None and sharded.layers[0].qkv_bias.abs().sum() > 0
    config = load_model_config(folder)
    assert model_fingerprint(config, folder) == model_fingerprint(config, tiny_qwen2_path)


def test_fingerprint_is_stable_and_discriminating(
    tiny_llama31_path: Path, tiny_mistral_path: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(tiny_llama31_path, tmp_path / "another-name")
    config = load_model_config(tiny_llama31_path)
    fingerprint = model_fingerprint(config, tiny_llama31_path)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert model_fingerprint(load_model_config(copy), copy) == fingerprint
    mistral = model_fingerprint(load_model_config(tiny_mistral_path), tiny_mistral_path)
    assert mistral != fingerprint
    # Same architecture and tensor shapes, other weights: a different model.
    reseeded = load_file(str(tiny_llama31_path / "model.safetensors"))
    reseeded = {name: torch.randn_like(t) for name, t in reseeded.items()}
    other = _copy_with_weights(tiny_llama31_path, tmp_path / "other", reseeded)
    assert model_fingerprint(load_model_config(other), other) != fingerprint


def test_kv_cache_sizes(tiny_llama31_path: Path) -> None:
    config = load_model_config(tiny_llama31_path)  # 3 layers, 2 kv heads, head_dim 16
    per_block = bytes_per_block(config, block_size=16, dtype=torch.bfloat16)
    assert per_block == 2 * 3 * 16 * 2 * 16 * 2
    assert num_blocks_for_bytes(config, 16, torch.bfloat16, 10 * per_block + 5) == 10
    cache = KVCache(config, num_blocks=10, block_size=16, dtype=torch.bfloat16, device="cpu")
    assert cache.nbytes() == 10 * per_block
    assert cache.layer(2).shape == (2, 10, 16, 2, 16)


def test_engine_refuses_a_model_folder_without_a_tokenizer(
    tiny_llama31_path: Path, tmp_path: Path
) -> None:
    """The tokenizer loads on a thread beside the weights; its failure must still stop the
    start with the error that names the folder, not vanish with the thread."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(
        tiny_llama31_path, folder, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*")
    )
    config = EngineConfig(model_path=folder, port=0, kv_cache_tokens=256)
    with pytest.raises(ModelFormatError, match=f"cannot load the tokenizer from {folder}"):
        build_engine(config)
