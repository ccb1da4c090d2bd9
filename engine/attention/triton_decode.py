"""Triton paged-decode attention: one query token per sequence, K/V read in place.

Each program serves one (sequence, kv head, split) and all the query heads of that kv
head's group together, so every K/V row is read from the paged cache once per kv head
(no gather copy, no repeat for GQA). It walks its share of the sequence's context in
tiles of `TILE` tokens, looking each token's block up in the block table, with an
online softmax in float32.

Split-K (flash-decoding): with few sequences the (sequence, kv head) grid leaves SMs
idle, so the context is cut into `num_splits` parts whose partial results a second,
tiny kernel merges. Every sequence cuts *its own* context length into the splits (read
from device memory like the loop bounds), so the launch depends only on host-side
bounds: a CUDA graph captured once replays correctly for any context lengths, and a
short context in a batch sized for long ones still spreads over the splits.

Contract: every `context_lens[b] >= 1` (a sequence attends at least to its own token).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.kernels.compile_ahead import launch

# Fewer tokens than this per split and the merge costs more than the parallelism gains.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 16


# Ints that change from step to step are not specialised on: else each new value class
# (1, a multiple of 16, other) compiles another variant while requests wait. The split
# count is a plain argument too: it follows the batch size, and as a constexpr it made
# each decode-graph bucket compile its own pair of kernels at start-up.
@triton.jit(do_not_specialize=["stride_tb", "num_splits"])
def _paged_decode_kernel(
    q_ptr, kv_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    scale, num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_kv, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_tb, stride_tn,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(ctx, num_splits), TILE) * TILE
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    offs_g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [GROUP_PAD, BLOCK_D]

    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_tb
    for start in range(lo, hi, TILE):
        offs_t = start + tl.arange(0, TILE)
        t_mask = offs_t < hi
        block = tl.load(table_row + (offs_t // BLOCK_SIZE) * stride_tn, mask=t_mask, other=0)
        row = block.to(tl.int64) * stride_kb + (offs_t % BLOCK_SIZE) * stride_ks
        kv_rows = kv_ptr + row[:, None] + kv_head * stride_kh + offs_d[None, :] * stride_kd
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(kv_rows, mask=kv_mask, other=0.0)  # [TILE, BLOCK_D]
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        scores = tl.where(t_mask[None, :], scores, float("-inf"))  # [GROUP_PAD, TILE]
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf, m_new finite)
        p = tl.exp(scores - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_rows + stride_kv, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    store_mask = g_mask[:, None] & d_mask[None, :]
    if num_splits == 1:
        out = acc / l_sum[:, None]
        o_rows = out_ptr + seq * stride_ob + heads[:, None] * stride_oh
        tl.store(
            o_rows + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=store_mask
        )
    else:
        # Partials [B, H, num_splits, BLOCK_D] and (m, l) [B, H, num_splits, 2], all written
        # (an empty split stores acc 0, m -inf, l 0) so the merge never reads garbage.
        part_row = (seq * (GROUP * tl.num_programs(1)) + heads).to(tl.int64) * num_splits + split
        tl.store(part_acc_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=store_mask)
        tl.store(part_ml_ptr + part_row * 2, m, mask=g_mask)
        tl.store(part_ml_ptr + part_row * 2 + 1, l_sum, mask=g_mask)


# One variant for every split count: the splits are folded in one by one, each rescaling
# what came before (a [MAX_SPLITS] vector load wasted more than it overlapped).
@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr,
    stride_ob, stride_oh, stride_od, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    first_row = (seq * tl.num_programs(1) + head).to(tl.int64) * num_splits
    # Split 0 is never empty (context >= 1): m is finite from it on, and an empty split
    # (m -inf, l 0, acc 0) then weighs exp(-inf) = 0.
    m = tl.load(part_ml_ptr + first_row * 2)
    l_sum = tl.load(part_ml_ptr + first_row * 2 + 1)
    acc = tl.load(part_acc_ptr + first_row * BLOCK_D + offs_d)
    for split in range(1, num_splits):
        row = first_row + split
        m_split = tl.load(part_ml_ptr + row * 2)
        m_new = tl.maximum(m, m_split)
        keep = tl.exp(m - m_new)
        take = tl.exp(m_split - m_new)
        l_sum = l_sum * keep + tl.load(part_ml_ptr + row * 2 + 1) * take
        acc = acc * keep + tl.load(part_acc_ptr + row * BLOCK_D + offs_d) * take
        m = m_new
    o_ptrs = out_ptr + seq * stride_ob + head * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, (acc / l_sum).to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device
) -> int:
    """Splits per sequence: enough programs for two waves over the SMs, but at least
    `MIN_TOKENS_PER_SPLIT` tokens of `max_context_len` (a bound is fine) per split.

    Depends only on host values, so a CUDA graph captured with bounds stays valid.
    """
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: splitting only adds work
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = triton.cdiv(2 * _sm_count(index), max(1, num_seqs * num_kv_heads))
    by_length = triton.cdiv(max(1, max_context_len), MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, by_length, MAX_SPLITS))


def paged_decode_attention(
    q: Tensor,  # [B, H, D]
    kv_layer: Tensor,  # [2, num_blocks, block_size, KVH, D]
    block_tables: Tensor,  # [B, max_blocks] int32 or int64
    context_lens: Tensor,  # [B] int32
    scale: float,
    max_context_len: int,
    num_splits: int | None = None,
) -> Tensor:  # [B, H, D] in q's dtype
    """Attention of each sequence's one query token over its first `context_lens[b]`
    cached tokens (which must include the token's own k/v, already written).

    `max_context_len` is any upper bound of `context_lens` (it only sizes the split
    count); `num_splits` (at most `MAX_SPLITS`) None chooses it. Launches only: no host
    sync, no allocation that depends on device values, so it can be captured in a CUDA
    graph.
    """
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, kv_dim = kv_layer.shape
    if kv_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_layer {tuple(kv_layer.shape)}")
    if block_tables.shape[0] != num_seqs or context_lens.shape[0] != num_seqs:
        raise ValueError("block_tables and context_lens need one row per query")
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    splits = num_splits or choose_num_splits(num_seqs, num_kv_heads, max_context_len, q.device)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be within 1..{MAX_SPLITS}, got {splits}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    on_gpu = q.is_cuda
    # Parts are only touched when splitting; a 1-element stand-in keeps the signature.
    part_shape = (num_seqs, num_heads, splits) if splits > 1 else (1, 1, 1)
    part_acc = q.new_empty((*part_shape, block_d), dtype=torch.float32)
    part_ml = q.new_empty((*part_shape, 2), dtype=torch.float32)
    launch(
        _paged_decode_kernel, (num_seqs, num_kv_heads, splits),
        q, kv_layer, block_tables, context_lens,
        out, part_acc, part_ml,
        scale, splits,
        *q.stride(),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2),
        kv_layer.stride(3), kv_layer.stride(4),
        *block_tables.stride(),
        *out.stride(),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, TILE=64 if on_gpu else 32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2 if on_gpu else 1,
    )  # fmt: skip
    if splits > 1:
        launch(
            _merge_splits_kernel, (num_seqs, num_heads),
            part_acc, part_ml, out,
            *out.stride(), splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=4 if block_d >= 128 else 2,
        )  # fmt: skip
    return out
