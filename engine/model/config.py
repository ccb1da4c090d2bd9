"""Parse and validate a Hugging Face `config.json` for the Llama family.

Everything the engine needs to know about the architecture lives in `ModelConfig`;
nothing downstream reads `config.json` again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# The seven projections a LoRA adapter may target, in forward order.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelFormatError(ValueError):
    """The model folder cannot be served; the message says what is wrong."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; other types are refused at parse time.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v carry a bias (Qwen2)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Mistral-style sliding-window attention is not implemented; the engine caps its
    # context at the window instead, where full attention is exactly the same.
    sliding_window: int | None = None
    name: str = ""

    def projection_shape(self, projection: str) -> tuple[int, int]:
        """`(out_features, in_features)` of one projection's base weight."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (q, self.hidden_size),
            "k_proj": (kv, self.hidden_size),
            "v_proj": (kv, self.hidden_size),
            "o_proj": (self.hidden_size, q),
            "gate_proj": (self.intermediate_size, self.hidden_size),
            "up_proj": (self.intermediate_size, self.hidden_size),
            "down_proj": (self.hidden_size, self.intermediate_size),
        }
        return shapes[projection]


def load_model_config(folder: Path) -> ModelConfig:
    """Read `folder/config.json`; raise ModelFormatError naming the first problem."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder} has no config.json; expected a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    return parse_model_config(raw, name=Path(folder).name)


def parse_model_config(raw: dict[str, Any], name: str = "") -> ModelConfig:
    architectures = raw.get("architectures") or []
    architecture = architectures[0] if architectures else _architecture_from_type(raw)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(
            f"architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ModelFormatError(f"hidden_act {hidden_act!r} is not supported; only 'silu' is")
    if raw.get("mlp_bias"):
        raise ModelFormatError("mlp_bias=true is not supported")

    hidden_size = _require_int(raw, "hidden_size")
    num_heads = _require_int(raw, "num_attention_heads")
    num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
    head_dim = int(raw.get("head_dim") or hidden_size // num_heads)
    if num_heads % num_kv_heads:
        raise ModelFormatError(
            f"num_attention_heads ({num_heads}) must be a multiple of "
            f"num_key_value_heads ({num_kv_heads})"
        )
    rope_theta, rope_scaling = _parse_rope(raw)
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelConfig(
        architecture=architecture,
        vocab_size=_require_int(raw, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_require_int(raw, "intermediate_size"),
        num_layers=_require_int(raw, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=architecture == "Qwen2ForCausalLM" or bool(raw.get("attention_bias")),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        sliding_window=_sliding_window(raw),
        name=name,
    )


def _sliding_window(raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if not window or raw.get("use_sliding_window") is False:
        return None
    return int(window)


def _architecture_from_type(raw: dict[str, Any]) -> str:
    by_type = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    return by_type.get(raw.get("model_type", ""), str(raw.get("model_type") or "<missing>"))


def _require_int(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ModelFormatError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value


def _parse_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Both layouts: transformers 4 (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`)."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {}) or None
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is None:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ModelFormatError(
            f"rope_scaling type {rope_type!r} is not supported; only 'llama3' is"
        )
    return theta, {
        "rope_type": "llama3",
        "factor": float(scaling["factor"]),
        "low_freq_factor": float(scaling["low_freq_factor"]),
        "high_freq_factor": float(scaling["high_freq_factor"]),
        "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
    }
