"""The CUDA attention backend: Triton varlen flash-attention, Triton paged decode.

A step with any prefill chunk runs `varlen_paged_attention` once per layer over the
whole flat batch (its decode tokens too: they are sequences of one query), reading
earlier context in place from the paged cache. A decode-only step runs the split-K
`paged_decode_attention`, which needs no index copies and no host values that change
from step to step: that is what lets the runner capture it in a CUDA graph (see
`AttentionMetadata.for_decode_graph`).
"""

from __future__ import annotations

from torch import Tensor

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import write_kv
from engine.attention.triton_decode import paged_decode_attention
from engine.attention.triton_prefill import varlen_paged_attention


def attend_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_layer: Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_written: bool = False,
) -> Tensor:
    """q `[T, H, D]`, k/v `[T, KVH, D]` -> `[T, H, D]`; writes k/v into the cache first
    unless `kv_written`."""
    if not kv_written:
        write_kv(kv_layer, k, v, meta.slot_mapping)
    if not meta.prefill_seqs:
        # Decode only: sequence s owns token s, so the kernel runs on q as it is.
        return paged_decode_attention(
            q, kv_layer, meta.block_tables, meta.context_lens_tensor, scale, meta.max_context_len
        )
    return varlen_paged_attention(
        q,
        kv_layer,
        meta.block_tables,
        meta.query_start_loc_tensor,
        meta.context_lens_tensor,
        scale,
    )
