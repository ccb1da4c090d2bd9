"""Reference paged attention in plain torch: any device, any dtype.

Prefill chunks run one sequence at a time through SDPA; all decode tokens of the step
run together as one gather + masked SDPA, so decode cost does not grow a Python loop
with the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.attention.metadata import AttentionMetadata

# SDPA learned grouped-query attention in torch 2.5; older versions repeat kv heads.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def write_kv(kv_layer: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store new k/v `[T, KVH, D]` at their cache slots in `kv_layer` `[2, nb, bs, KVH, D]`."""
    num_kv_heads, head_dim = kv_layer.shape[-2:]
    kv_layer[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_layer[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def attend_torch(
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
    out = torch.empty_like(q)
    attend_prefill(q, k, v, kv_layer, meta, scale, out)
    if meta.decode_seqs:
        q_decode = q.index_select(0, meta.decode_token_index)
        out.index_copy_(0, meta.decode_token_index, _decode_all(q_decode, kv_layer, meta, scale))
    return out


def attend_prefill(
    q: Tensor,  # [T, H, D]
    k: Tensor,  # [T, KVH, D]
    v: Tensor,  # [T, KVH, D]
    kv_layer: Tensor,  # [2, num_blocks, block_size, KVH, D], new k/v already written
    meta: AttentionMetadata,
    scale: float,
    out: Tensor,  # [T, H, D]
) -> None:
    """Fill the rows of `out` of every prefill chunk (decode rows are left alone)."""
    for seq in meta.prefill_seqs:
        start, end = meta.query_start_loc[seq], meta.query_start_loc[seq + 1]
        out[start:end] = _prefill_one(q, k, v, kv_layer, meta, seq, scale)


def _prefill_one(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_layer: Tensor,
    meta: AttentionMetadata,
    seq: int,
    scale: float,
) -> Tensor:
    start, end = meta.query_start_loc[seq], meta.query_start_loc[seq + 1]
    q_len, ctx = end - start, meta.context_lens[seq]
    if ctx == q_len:
        # No cached prefix: the keys are exactly this chunk's, no gather or offset mask.
        return _sdpa(q[start:end], k[start:end], v[start:end], None, scale, causal=True)
    num_blocks = -(-ctx // meta.block_size)
    blocks = meta.block_tables[seq, :num_blocks].long()
    head_shape = kv_layer.shape[-2:]
    keys = kv_layer[0, blocks].reshape(-1, *head_shape)[:ctx]  # [ctx, KVH, D]
    values = kv_layer[1, blocks].reshape(-1, *head_shape)[:ctx]
    query_pos = torch.arange(ctx - q_len, ctx, device=q.device)
    mask = torch.arange(ctx, device=q.device)[None, :] <= query_pos[:, None]  # [q_len, ctx]
    return _sdpa(q[start:end], keys, values, mask, scale, causal=False)


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool
) -> Tensor:
    """q `[L, H, D]`, k/v `[S, KVH, D]` -> `[L, H, D]`."""
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
    group = q.shape[0] // k.shape[0]
    extra = {}
    if group > 1 and _SDPA_HAS_GQA:
        extra["enable_gqa"] = True
    elif group > 1:
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **extra
    )
    return out.transpose(0, 1)


def _decode_all(q: Tensor, kv_layer: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """q `[N, H, D]` (one token per decode sequence) -> `[N, H, D]`."""
    num, num_heads, head_dim = q.shape
    num_kv_heads = kv_layer.shape[-2]
    tables = meta.decode_block_tables  # [N, nb] long
    # [N, nb, bs, KVH, D] -> [N, KVH, nb*bs, D]
    keys = kv_layer[0][tables].view(num, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = kv_layer[1][tables].view(num, -1, num_kv_heads, head_dim).transpose(1, 2)
    # The query heads sharing a kv head become SDPA's query-length axis: GQA without
    # repeating k/v, and no causal mask is needed among them (they are one position).
    grouped = q.view(num, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=meta.decode_key_mask, scale=scale
    )  # [N, KVH, group, D]
    return out.reshape(num, num_heads, head_dim)
