"""Rotary position embeddings (rotate-half / NeoX layout, as Hugging Face Llama).

cos/sin are precomputed once for every position up to `max_position_embeddings`, so a
forward pass only gathers rows by position; the values equal what transformers computes
on the fly (same float32 formulas), which keeps logits in parity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from engine.model.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse frequencies `[head_dim // 2]` float32, with `llama3` scaling when configured.

    Mirrors transformers' `_compute_default_rope_parameters` and `_compute_llama3_parameters`.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flat-batch q/k given each token's absolute position."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config).to(device)  # [head_dim/2] f32
        positions = torch.arange(config.max_position_embeddings, device=device).float()
        freqs = positions[:, None] * inv_freq[None, :]  # [max_pos, head_dim/2] f32
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """q `[T, H, D]`, k `[T, KVH, D]`, positions `[T]` long -> rotated (q, k), same dtypes.

        Like transformers, cos/sin are cast to the activation dtype before the rotation.
        """
        cos = self.cos.index_select(0, positions).to(q.dtype)[:, None, :]  # [T, 1, D/2]
        sin = self.sin.index_select(0, positions).to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def rotate_and_store_(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        positions: Tensor,
        kv_layer: Tensor,
        slot_mapping: Tensor,
    ) -> None:
        """Rotates q and k in place and writes k and v into `kv_layer` at `slot_mapping`,
        in one Triton launch (CUDA only; see `engine.kernels.fused.rope_qk_`)."""
        from engine.kernels.fused import rope_qk_

        rope_qk_(q, k, positions, self.cos, self.sin, store=(v, kv_layer, slot_mapping))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x*cos + rotate_half(x)*sin, written per half; rotate_half(x) = cat(-x2, x1).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
