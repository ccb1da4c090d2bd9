"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) over a flat token batch.

Projections are fused per layer: `qkv_proj` stacks q, k, v rows (Qwen2 adds a bias),
`gate_up_proj` stacks gate then up. One forward runs the new tokens of many sequences
at once (prefill chunks and decode tokens mixed), reading and writing the paged KV cache
through the attention backend. Weights come from `engine.model.loader`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import AttentionBackend, AttentionMetadata, select_backend
from engine.kernels import triton_available
from engine.kv_cache import KVCache
from engine.model.config import ModelConfig
from engine.model.lora_hook import LoraApplier
from engine.model.rope import RotaryEmbedding


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in float32, cast back before the weight (as transformers does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, fused: bool
) -> tuple[Tensor, Tensor]:
    """`residual = x + residual` (or `x` when None), then (rms_norm(residual), residual).

    `fused` runs it as one Triton launch that updates `residual` in place; the torch
    path allocates. Both round the sum to the activation dtype before the norm.
    """
    if fused:
        from engine.kernels.fused import add_rms_norm as fused_add_rms_norm

        normed = fused_add_rms_norm(x, residual, weight, eps)
        return normed, x if residual is None else residual
    residual = x if residual is None else residual + x
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: Tensor, fused: bool) -> Tensor:
    """`silu(gate) * up` of a fused `[T, 2*I]` gate/up projection -> `[T, I]`."""
    if fused:
        from engine.kernels.fused import silu_and_mul as fused_silu_and_mul

        return fused_silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_ops_available(device: torch.device) -> bool:
    """Whether the fused Triton element-wise kernels (`engine.kernels.fused`) can run."""
    return device.type == "cuda" and triton_available()


def _weight(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Filled by the loader; inference only, so no autograd bookkeeping.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    """One pre-norm attention + SwiGLU MLP block with fused projections.

    The residual stream is carried separately from each block's output, so that the
    residual add of one block is fused into the next block's norm.
    """

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device, fused: bool
    ) -> None:
        super().__init__()
        self.fused = fused
        hidden, inter = config.hidden_size, config.intermediate_size
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.eps = config.rms_norm_eps
        self.scale = config.head_dim**-0.5
        p = {"dtype": dtype, "device": device}
        self.input_norm = _weight(hidden, **p)
        qkv_rows = self.q_size + 2 * self.kv_size
        self.qkv_proj = _weight(qkv_rows, hidden, **p)
        self.qkv_bias = _weight(qkv_rows, **p) if config.attention_bias else None
        self.o_proj = _weight(hidden, self.q_size, **p)
        self.o_bias = _weight(hidden, **p) if has_o_proj_bias(config) else None
        self.post_attention_norm = _weight(hidden, **p)
        self.gate_up_proj = _weight(2 * inter, hidden, **p)
        self.down_proj = _weight(hidden, inter, **p)

    def forward(
        self,
        layer: int,
        h: Tensor,  # [T, hidden]: the previous block's output (the embeddings first)
        residual: Tensor | None,  # [T, hidden]: the residual stream before h, None first
        rope: RotaryEmbedding,
        positions: Tensor,  # [T] long
        attend: AttentionBackend,
        meta: AttentionMetadata,
        kv_layer: Tensor,  # [2, num_blocks, block_size, KVH, D]
        lora: LoraApplier | None,
    ) -> tuple[Tensor, Tensor]:  # (this block's output [T, hidden], residual [T, hidden])
        num_tokens = h.shape[0]
        x, residual = add_rms_norm(h, residual, self.input_norm, self.eps, self.fused)
        qkv = F.linear(x, self.qkv_proj, self.qkv_bias)  # [T, q + 2*kv]
        if lora is not None:
            lora.apply(layer, "qkv", x, qkv)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.fused:  # one launch rotates q/k and stores k/v in the cache
            rope.rotate_and_store_(q, k, v, positions, kv_layer, meta.slot_mapping)
            attn = attend(q, k, v, kv_layer, meta, self.scale, kv_written=True)
        else:
            q, k = rope(q, k, positions)
            attn = attend(q, k, v, kv_layer, meta, self.scale)
        attn = attn.reshape(num_tokens, self.q_size)
        o = F.linear(attn, self.o_proj, self.o_bias)  # [T, hidden]
        if lora is not None:
            lora.apply(layer, "o", attn, o)

        x, residual = add_rms_norm(o, residual, self.post_attention_norm, self.eps, self.fused)
        gate_up = F.linear(x, self.gate_up_proj)  # [T, 2*inter]
        if lora is not None:
            lora.apply(layer, "gate_up", x, gate_up)
        act = silu_and_mul(gate_up, self.fused)  # [T, inter]
        down = F.linear(act, self.down_proj)  # [T, hidden]
        if lora is not None:
            lora.apply(layer, "down", act, down)
        return down, residual


def has_o_proj_bias(config: ModelConfig) -> bool:
    """Llama/Mistral `attention_bias` also covers o_proj; Qwen2's bias is q/k/v only."""
    return config.attention_bias and config.architecture != "Qwen2ForCausalLM"


class LlamaModel(nn.Module):
    """The decoder plus embeddings and LM head; parameters are empty until loaded.

    `lm_head` is None when embeddings are tied (the head reuses `embed_tokens`).
    """

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        attend: AttentionBackend | None = None,
        fused_ops: bool | None = None,
    ) -> None:
        """`fused_ops` None uses the fused Triton element-wise kernels where they run
        (CUDA with Triton); False keeps the plain torch code everywhere."""
        super().__init__()
        device = torch.device(device)
        self.fused_ops = fused_ops_available(device) if fused_ops is None else fused_ops
        self.config = config
        self.dtype = dtype
        self.device = device
        self.attend = attend or select_backend(device)
        p = {"dtype": dtype, "device": device}
        self.embed_tokens = _weight(config.vocab_size, config.hidden_size, **p)
        self.layers = nn.ModuleList(
            DecoderLayer(config, dtype, device, self.fused_ops) for _ in range(config.num_layers)
        )
        self.norm = _weight(config.hidden_size, **p)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _weight(config.vocab_size, config.hidden_size, **p)
        )
        self.rope = RotaryEmbedding(config, device)

    @contextmanager
    def first_layer_only(self) -> Iterator[None]:
        """Within the block a forward runs the first decoder layer alone, then the final
        norm and head: enough for a pass that only gathers the kernels a forward
        launches (`engine.kernels.compile_ahead`), since every layer has the same shapes
        and so launches the same kernel variants, at 1/num_layers of the host time."""
        layers = self.layers
        self.layers = layers[:1]
        try:
            yield
        finally:
            self.layers = layers

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,  # [T] long
        positions: Tensor,  # [T] long
        attn: AttentionMetadata,
        kv_cache: KVCache,
        lora: LoraApplier | None,
        logits_indices: Tensor,  # [N] long, flat token indices to score
    ) -> Tensor:  # [N, vocab] float32
        """Run one step: write every token's k/v into the cache, return logits of
        `logits_indices` (typically each sequence's last token in this step)."""
        h = F.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        residual = None
        for index, layer in enumerate(self.layers):
            h, residual = layer(
                index, h, residual, self.rope, positions, self.attend, attn,
                kv_cache.layer(index), lora,
            )  # fmt: skip
        # Norm and head only for the tokens we sample from: the head is the widest GEMM.
        assert residual is not None
        h, _ = add_rms_norm(
            h.index_select(0, logits_indices),
            residual.index_select(0, logits_indices),
            self.norm,
            self.config.rms_norm_eps,
            self.fused_ops,
        )
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(h, head).float()  # [N, vocab]
