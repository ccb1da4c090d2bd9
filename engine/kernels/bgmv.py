"""Triton BGMV shrink/expand: multi-LoRA for decode, one token per program row.

Every program serves one token and gathers its own adapter's A or B rows, so a batch of
decode tokens with all-different adapters costs one pass over each token's adapter and
nothing is padded to a tile of tokens. Programs walk tokens in `sorted_token_ids` order,
so tokens sharing an adapter run side by side and share its rows through L2; tokens with
slot -1 sort last and return at once. The grid depends only on T and the shapes (plus
the batch's max rank), which keeps it stable from step to step for CUDA graphs.

At small batches the shrink splits its reduction over `in` to fill the GPU: each split
stores its partial sums into its own plane of h, and the expand loads every plane of
a token's rank vector in one masked load and adds them up, so h is never zero-filled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from engine.kernels.compile_ahead import launch
from engine.kernels.lora_ops import MAX_SPLIT_K
from engine.kernels.meta import LoraKernelMeta
from engine.kernels.triton_common import (
    LaunchConfig,
    cached_config,
    cdiv,
    next_pow2,
    padded_offsets,
    slice_bounds,
    split_k_for,
)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    sorted_ids_ptr, token_slots_ptr, slot_ranks_ptr,
    in_features, r_eff, n_rows, k_per_split,
    stride_xt, stride_xk,
    stride_as, stride_ai, stride_ar, stride_ak,
    stride_hp, stride_ht, stride_hi, stride_hr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tok = tl.load(sorted_ids_ptr + tl.program_id(0)).to(tl.int64)
    slot = tl.load(token_slots_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    rank = tl.load(slot_ranks_ptr + slot)
    # The N axis runs over (slice, rank row) pairs flattened as slice * r_eff + j.
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    sl = offs_n // r_eff
    j = offs_n - sl * r_eff
    n_mask = (offs_n < n_rows) & (j < rank)
    if tl.max(n_mask.to(tl.int32), axis=0) == 0:
        return

    a_rows = a_ptr + slot * stride_as + sl[:, None] * stride_ai + j[:, None] * stride_ar
    x_row = x_ptr + tok * stride_xt
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, in_features)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        xk = tl.load(x_row + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
        at = tl.load(
            a_rows + offs_k[None, :] * stride_ak, mask=n_mask[:, None] & k_mask[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_K]
        acc += tl.sum(at.to(tl.float32) * xk[None, :], axis=1)

    # Split k owns plane k of h: a plain store, no atomics and no zero-fill beforehand.
    h_plane = h_ptr + tl.program_id(2).to(tl.int64) * stride_hp
    tl.store(h_plane + tok * stride_ht + sl * stride_hi + j * stride_hr, acc, mask=n_mask)


# `num_splits` follows the batch size: not specialised on, so it compiles no variants.
@triton.jit(do_not_specialize=["num_splits"])
def _bgmv_expand_kernel(
    h_ptr, b_ptr, out_ptr,
    sorted_ids_ptr, token_slots_ptr, slot_ranks_ptr,
    total_out, o0, o1, o2, o3, o4, num_splits,
    stride_hp, stride_ht, stride_hi, stride_hr,
    stride_bs, stride_bn, stride_br,
    stride_ot, stride_on,
    N_SLICES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
):  # fmt: skip
    tok = tl.load(sorted_ids_ptr + tl.program_id(0)).to(tl.int64)
    slot = tl.load(token_slots_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    rank = tl.load(slot_ranks_ptr + slot)
    if rank == 0:
        return
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    b_tile = b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    # All split planes of the token's rank vector in one load, [SPLIT_PAD, BLOCK_R]: the
    # loads of the planes overlap rather than queue one after another.
    offs_p = tl.arange(0, SPLIT_PAD)
    h_tok = h_ptr + tok * stride_ht + offs_p[:, None] * stride_hp + offs_r[None, :] * stride_hr
    h_mask = (offs_p < num_splits)[:, None] & r_mask[None, :]

    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # A block of columns may straddle slices: each slice it touches adds its own part.
    for i in tl.static_range(N_SLICES):
        lo, hi = slice_bounds(i, o0, o1, o2, o3, o4)
        if (lo < n0 + BLOCK_N) & (hi > n0):
            ht = tl.load(h_tok + i * stride_hi, mask=h_mask, other=0.0)
            hr = tl.sum(ht.to(tl.float32), axis=0)
            cols = (offs_n >= lo) & (offs_n < hi)
            bt = tl.load(b_tile, mask=cols[:, None] & r_mask[None, :], other=0.0)  # [N, R]
            acc += tl.sum(bt.to(tl.float32) * hr[None, :], axis=1)

    o_ptrs = out_ptr + tok * stride_ot + offs_n * stride_on
    o_mask = offs_n < total_out
    base = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (base.to(tl.float32) + acc).to(base.dtype), mask=o_mask)


def shrink_config(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraKernelMeta) -> LaunchConfig:
    """Heuristic tiles for `bgmv_shrink`, from a sweep on an H200 at Llama-8B shapes.

    Decode batches are small, so the work is cut fine: 16 (slice, rank) rows per program
    and the reduction split until there are ~6 programs per SM (each still 2+ K-blocks).
    """
    _, n_slices, _, in_features = lora_a.shape
    block_n, block_k = 16, min(128, next_pow2(in_features, 32))
    programs = meta.num_active * cdiv(n_slices * meta.max_rank, block_n)
    split_k = split_k_for(programs, in_features, block_k, x.device, waves=6, min_k_blocks=2)
    return LaunchConfig(1, block_n, block_k, split_k, num_warps=8, num_stages=3)


def expand_config(out: torch.Tensor, meta: LoraKernelMeta) -> LaunchConfig:
    """Heuristic tiles for `bgmv_expand`."""
    block_r = next_pow2(meta.max_rank)
    # Keep the [BLOCK_N, BLOCK_R] B tile near 4096 elements (32 per thread at 4 warps).
    block_n = (
        max(32, min(256, 4096 // block_r)) if out.is_cuda else min(128, next_pow2(out.shape[1]))
    )
    return LaunchConfig(1, block_n, block_r)


def bgmv_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    h: torch.Tensor,
    meta: LoraKernelMeta,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Write planes of h that add up to `x[t] @ lora_a[s, i, :r].T` for every token with a
    slot, and return them.

    Same tensors and contract as `sgmv_shrink`.
    """
    if meta.num_active == 0 or meta.max_rank == 0:
        return h[:1]
    _, n_slices, _, in_features = lora_a.shape
    cfg = config or cached_config(
        meta,
        ("bgmv_shrink", n_slices, in_features, x.dtype, x.device),
        lambda: shrink_config(x, lora_a, meta),
    )
    n_rows = n_slices * meta.max_rank
    split_k = cfg.splits(in_features)
    if split_k > h.shape[0]:
        raise ValueError(f"the shrink splits {split_k} ways but h has {h.shape[0]} planes")
    # Tokens past num_active have no slot; the grid still covers them so its size only
    # depends on T, not on how many tokens carry an adapter.
    grid = (meta.num_tokens, cdiv(n_rows, cfg.block_n), split_k)
    launch(
        _bgmv_shrink_kernel, grid,
        x, lora_a, h,
        meta.sorted_token_ids, meta.token_slots, meta.slot_ranks,
        in_features, meta.max_rank, n_rows, cfg.k_per_split(in_features),
        x.stride(0), x.stride(1),
        *lora_a.stride(),
        *h.stride(),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages if x.is_cuda else 1,
    )  # fmt: skip
    return h[:split_k]


def bgmv_expand(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: LoraKernelMeta,
    config: LaunchConfig | None = None,
) -> None:
    """`out[t, o_i:o_{i+1}] += h.sum(0)[t, i, :r] @ lora_b[s, o_i:o_{i+1}, :r].T`, in place.

    Same tensors and contract as `sgmv_expand`.
    """
    if meta.num_active == 0 or meta.max_rank == 0:
        return
    total_out = out.shape[1]
    cfg = config or cached_config(
        meta, ("bgmv_expand", total_out, out.dtype, out.device), lambda: expand_config(out, meta)
    )
    num_splits = h.shape[0]
    grid = (meta.num_tokens, cdiv(total_out, cfg.block_n))
    launch(
        _bgmv_expand_kernel, grid,
        h, lora_b, out,
        meta.sorted_token_ids, meta.token_slots, meta.slot_ranks,
        total_out, *padded_offsets(slice_offsets), num_splits,
        *h.stride(),
        *lora_b.stride(),
        out.stride(0), out.stride(1),
        N_SLICES=len(slice_offsets) - 1, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_k,
        # Two variants only, whatever the split count: unsplit, or room for the most.
        SPLIT_PAD=1 if num_splits == 1 else MAX_SPLIT_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages if out.is_cuda else 1,
    )  # fmt: skip
