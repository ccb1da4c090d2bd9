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
from engine.model.lora_hook import PROJECTION_GROUPS, LoraApplier
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
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        fused: bool,
        fold_rank: int = 0,
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
        # With `fold_rank`, each projection's weight is the first rows of a storage with
        # room after them for one adapter's A rows (`fold_rows`), zero until filled.
        self.fold_rank = fold_rank
        self._folded: dict[str, Tensor] = {}  # group -> [out + n_slices * fold_rank, in]
        self.qkv_proj = self._projection("qkv", qkv_rows, hidden, p)
        self.qkv_bias = _weight(qkv_rows, **p) if config.attention_bias else None
        self.o_proj = self._projection("o", hidden, self.q_size, p)
        self.o_bias = _weight(hidden, **p) if has_o_proj_bias(config) else None
        self.post_attention_norm = _weight(hidden, **p)
        self.gate_up_proj = self._projection("gate_up", 2 * inter, hidden, p)
        self.down_proj = self._projection("down", hidden, inter, p)

    def _projection(self, group: str, rows: int, cols: int, p: dict) -> nn.Parameter:
        if not self.fold_rank:
            return _weight(rows, cols, **p)
        spare = len(PROJECTION_GROUPS[group]) * self.fold_rank
        self._folded[group] = torch.zeros(rows + spare, cols, **p)
        return nn.Parameter(self._folded[group][:rows], requires_grad=False)

    def fold_rows(self, group: str) -> Tensor:
        """The spare rows after `group`'s weight, `[n_slices * fold_rank, in]`."""
        full = self._folded[group]
        return full[full.shape[0] - len(PROJECTION_GROUPS[group]) * self.fold_rank :]

    def _project(
        self,
        layer: int,
        group: str,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora: LoraApplier | None,
    ) -> Tensor:
        """`group`'s projection of x, plus each tagged token's LoRA delta. When `lora`
        folds its shrink, one GEMM over the weight and its spare rows (which then hold
        an adapter's A) gives both the base output and the adapter's rank vectors."""
        if lora is None or not lora.folded:
            out = F.linear(x, weight, bias)
            if lora is not None:
                lora.apply(layer, group, x, out)
            return out
        full = self._folded[group]
        out, h = F.linear(x, full).split((weight.shape[0], full.shape[0] - weight.shape[0]), -1)
        if bias is not None:
            out += bias
        lora.expand(layer, group, h, out)
        return out

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
        qkv = self._project(layer, "qkv", x, self.qkv_proj, self.qkv_bias, lora)  # [T, q + 2*kv]
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
        o = self._project(layer, "o", attn, self.o_proj, self.o_bias, lora)  # [T, hidden]
        x, residual = add_rms_norm(o, residual, self.post_attention_norm, self.eps, self.fused)
        gate_up = self._project(layer, "gate_up", x, self.gate_up_proj, None, lora)  # [T, 2*inter]
        act = silu_and_mul(gate_up, self.fused)  # [T, inter]
        down = self._project(layer, "down", act, self.down_proj, None, lora)  # [T, hidden]
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
        fold_rank: int = 0,
    ) -> None:
        """`fused_ops` None uses the fused Triton element-wise kernels where they run
        (CUDA with Triton); False keeps the plain torch code everywhere. `fold_rank` > 0
        gives every projection room for one adapter's A rows at that rank, for LoRA
        that folds its shrink into the base GEMM (`LoraApplier.folded`)."""
        super().__init__()
        device = torch.device(device)
        self.fused_ops = fused_ops_available(device) if fused_ops is None else fused_ops
        self.fold_rank = fold_rank
        self.config = config
        self.dtype = dtype
        self.device = device
        self.attend = attend or select_backend(device)
        p = {"dtype": dtype, "device": device}
        self.embed_tokens = _weight(config.vocab_size, config.hidden_size, **p)
        self.layers = nn.ModuleList(
            DecoderLayer(config, dtype, device, self.fused_ops, fold_rank)
            for _ in range(config.num_layers)
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
