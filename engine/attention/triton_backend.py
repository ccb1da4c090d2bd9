"""The CUDA attention backend: Triton paged decode, torch/SDPA prefill.

Decode tokens attend with `paged_decode_attention`, which reads K/V in place from the
paged cache; prefill chunks go through the torch reference's per-sequence SDPA (its
FlashAttention kernels). A decode-only batch takes a path without any index copies and
without host values that change from step to step, which is what lets the runner
capture it in a CUDA graph (see `AttentionMetadata.for_decode_graph`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import attend_prefill, write_kv
from engine.attention.triton_decode import paged_decode_attention


def attend_triton(
    q: Tensor, k: Tensor, v: Tensor, kv_layer: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """q `[T, H, D]`, k/v `[T, KVH, D]` -> `[T, H, D]`; writes k/v into the cache first."""
    write_kv(kv_layer, k, v, meta.slot_mapping)
    if not meta.prefill_seqs:
        # Decode only: sequence s owns token s, so the kernel runs on q as it is.
        return paged_decode_attention(
            q, kv_layer, meta.block_tables, meta.context_lens_tensor, scale, meta.max_context_len
        )
    out = torch.empty_like(q)
    attend_prefill(q, k, v, kv_layer, meta, scale, out)
    if meta.decode_seqs:
        decoded = paged_decode_attention(
            q.index_select(0, meta.decode_token_index),
            kv_layer,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            meta.max_context_len,
        )  # [num_decode, H, D]
        out.index_copy_(0, meta.decode_token_index, decoded)
    return out
