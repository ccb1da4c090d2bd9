"""Triton SGMV shrink/expand: multi-LoRA over segments of tokens that share an adapter.

For prefill, where many tokens carry the same adapter. The grid runs over (output block,
token tile), where the token tiles are cut per segment and numbered across segments, so
no program is idle however uneven the segments are. A program gathers its token rows
through `sorted_token_ids` (the tokens of an adapter need not be contiguous in the
batch), so each adapter's A and B tiles are read once per token tile and fed to
tensor-core `tl.dot`s. Rank rows at or beyond a slot's rank are masked off (never
loaded), and segments only exist for tokens with a slot, so tokens with slot -1 cost
nothing.

When the token tiles alone leave SMs idle, the shrink splits its reduction over `in`:
each split stores its partial sums into its own plane of h (no atomics, so h needs no
zero-fill first), and the expand adds the planes up as it loads each h tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from engine.kernels.compile_ahead import launch
from engine.kernels.meta import LoraKernelMeta
from engine.kernels.triton_common import (
    LaunchConfig,
    cached_config,
    cdiv,
    dot_precision,
    next_pow2,
    padded_offsets,
    slice_bounds,
    split_k_for,
)


@triton.jit
def _tile_segment(
    pid_m, seg_starts_ptr, num_segments, BLOCK_M: tl.constexpr, SEG_PAD: tl.constexpr
):
    """`(segment, first row, end row)` of token tile `pid_m`, counting tiles over all
    segments in order. The grid then holds exactly the tiles that have tokens, however
    uneven the segments are (one long prefill beside many single decode tokens)."""
    offs_g = tl.arange(0, SEG_PAD)
    g_mask = offs_g < num_segments
    starts = tl.load(seg_starts_ptr + offs_g, mask=g_mask, other=0)
    ends = tl.load(seg_starts_ptr + offs_g + 1, mask=g_mask, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tiles_through = tl.cumsum(tiles, axis=0)  # tiles of segments 0..g
    seg = tl.sum((tiles_through <= pid_m).to(tl.int32), axis=0)
    pick = offs_g == seg
    first_tile = tl.sum(tl.where(pick, tiles_through - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(pick, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    return seg, row0, tl.sum(tl.where(pick, ends, 0), axis=0)


# Ints that change from step to step are not specialised on: else each new value class
# (1, a multiple of 16, other) compiles another variant while requests wait.
@triton.jit(do_not_specialize=["num_segments", "num_splits"])
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    sorted_ids_ptr, seg_starts_ptr, seg_slots_ptr, slot_ranks_ptr, num_segments,
    in_features, r_eff, n_rows, num_splits, k_per_split,
    stride_xt, stride_xk,
    stride_as, stride_ai, stride_ar, stride_ak,
    stride_hp, stride_ht, stride_hi, stride_hr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SEG_PAD: tl.constexpr,
):  # fmt: skip
    # Axis 0 (fastest) walks the rank blocks and K splits of one token block, so the
    # programs that re-read that block of x run together and hit it in L2.
    pid_nk = tl.program_id(0)
    pid_n = pid_nk // num_splits
    pid_k = pid_nk % num_splits
    seg, row0, seg_end = _tile_segment(
        tl.program_id(1), seg_starts_ptr, num_segments, BLOCK_M, SEG_PAD
    )
    if seg >= num_segments:
        return  # a spare tile of a grid sized by a bound (a CUDA graph's)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    rank = tl.load(slot_ranks_ptr + slot)

    # The N axis runs over (slice, rank row) pairs flattened as slice * r_eff + j.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sl = offs_n // r_eff
    j = offs_n - sl * r_eff
    n_mask = (offs_n < n_rows) & (j < rank)
    if tl.max(n_mask.to(tl.int32), axis=0) == 0:
        return

    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_end
    tok = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    x_rows = x_ptr + tok[:, None] * stride_xt  # [BLOCK_M, 1]
    a_rows = a_ptr + slot * stride_as + sl[None, :] * stride_ai + j[None, :] * stride_ar

    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        xt = tl.load(
            x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_K]
        at = tl.load(
            a_rows + offs_k[:, None] * stride_ak, mask=k_mask[:, None] & n_mask[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)

    # Split k owns plane k of h: a plain store, no atomics and no zero-fill beforehand.
    h_plane = h_ptr + pid_k.to(tl.int64) * stride_hp
    h_ptrs = h_plane + tok[:, None] * stride_ht + sl[None, :] * stride_hi + j[None, :] * stride_hr
    tl.store(h_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


# Ints that change from step to step are not specialised on: else each new value class
# (1, a multiple of 16, other) compiles another variant while requests wait.
@triton.jit(do_not_specialize=["num_segments", "num_splits"])
def _sgmv_expand_kernel(
    h_ptr, b_ptr, out_ptr,
    sorted_ids_ptr, seg_starts_ptr, seg_slots_ptr, slot_ranks_ptr, num_segments,
    total_out, o0, o1, o2, o3, o4, num_splits,
    stride_hp, stride_ht, stride_hi, stride_hr,
    stride_bs, stride_bn, stride_br,
    stride_ot, stride_on,
    N_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, SEG_PAD: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    seg, row0, seg_end = _tile_segment(
        tl.program_id(1), seg_starts_ptr, num_segments, BLOCK_M, SEG_PAD
    )
    if seg >= num_segments:
        return  # a spare tile of a grid sized by a bound (a CUDA graph's)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    rank = tl.load(slot_ranks_ptr + slot)
    if rank == 0:
        return

    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_end
    tok = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    b_tile = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br
    h_tile = h_ptr + tok[:, None] * stride_ht + offs_r[None, :] * stride_hr  # plane 0
    h_mask = m_mask[:, None] & r_mask[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A block of columns may straddle slices (sizes need not be multiples of BLOCK_N):
    # every slice it touches contributes its own h columns, masked to its own columns.
    for i in tl.static_range(N_SLICES):
        lo, hi = slice_bounds(i, o0, o1, o2, o3, o4)
        if (lo < n0 + BLOCK_N) & (hi > n0):
            ht = tl.load(h_tile + i * stride_hi, mask=h_mask, other=0.0)  # [BLOCK_M, BLOCK_R] f32
            # The planes of a split-K shrink add up to h (none past plane 0 when unsplit).
            for p in range(1, num_splits):
                ht += tl.load(h_tile + p * stride_hp + i * stride_hi, mask=h_mask, other=0.0)
            cols = (offs_n >= lo) & (offs_n < hi)
            bt = tl.load(b_tile, mask=r_mask[:, None] & cols[None, :], other=0.0)  # [R, N]
            acc = tl.dot(ht.to(bt.dtype), bt, acc, input_precision=DOT_PRECISION)

    o_ptrs = out_ptr + tok[:, None] * stride_ot + offs_n[None, :] * stride_on
    o_mask = m_mask[:, None] & (offs_n < total_out)[None, :]
    base = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (base.to(tl.float32) + acc).to(base.dtype), mask=o_mask)


def _block_m(meta: LoraKernelMeta, device: torch.device) -> int:
    """Token rows per tile: 16 for decode-sized segments, else 64. Two sizes only: each
    compiles its own kernels at start-up (~0.6 s apiece on the H200 host), and a tile of
    64 over a shorter segment loads no more (its spare rows are masked off)."""
    if device.type != "cuda":
        return 32
    return 16 if meta.max_seg_len <= 16 else 64


def seg_pad(meta: LoraKernelMeta) -> int:
    """The segment-table width the kernels scan: sized by the pool, not the batch, so
    that the count of adapters in a step never selects (and compiles) a new variant.
    The same for a CUDA graph's meta: sized by its segment bound, every decode bucket
    would compile variants of its own while the engine starts."""
    return max(2, next_pow2(meta.num_slots))


def num_tiles(meta: LoraKernelMeta, block_m: int) -> int:
    """Token tiles of `block_m` rows over all segments (a tile never spans two); for a
    `bounded` meta, the most any grouping of its tokens can need (each segment adds at
    most one partial tile), and the spare tiles exit at once."""
    if meta.bounded:
        return cdiv(meta.num_tokens, block_m) + meta.num_segments
    key = ("sgmv_tiles", block_m)
    tiles = meta.launch_cache.get(key)
    if tiles is None:
        starts = meta.seg_starts_host
        pairs = zip(starts[:-1], starts[1:], strict=True)
        tiles = meta.launch_cache[key] = sum(cdiv(b - a, block_m) for a, b in pairs)
    return tiles


def shrink_config(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraKernelMeta) -> LaunchConfig:
    """Heuristic tiles for `sgmv_shrink`, from a sweep on an H200 at Llama-8B shapes.

    The shrink streams x once per rank block, so it is memory-bound: one wave of deep
    pipelined programs did best, with the reduction split only to fill that wave.
    """
    _, n_slices, _, in_features = lora_a.shape
    block_m = _block_m(meta, x.device)
    n_rows = n_slices * meta.max_rank
    block_n = min(64, next_pow2(n_rows))
    block_k = min(128 if x.element_size() <= 2 else 64, next_pow2(in_features, 32))
    programs = num_tiles(meta, block_m) * cdiv(n_rows, block_n)
    waves = 1 if block_m >= 64 else 2  # short segments: smaller programs, more of them
    split_k = split_k_for(programs, in_features, block_k, x.device, waves, min_k_blocks=4)
    return LaunchConfig(block_m, block_n, block_k, split_k, num_warps=8, num_stages=4)


def expand_config(out: torch.Tensor, meta: LoraKernelMeta) -> LaunchConfig:
    """Heuristic tiles for `sgmv_expand`."""
    block_n = 128 if out.is_cuda else min(128, next_pow2(out.shape[1], 32))
    return LaunchConfig(_block_m(meta, out.device), block_n, next_pow2(meta.max_rank))


def sgmv_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    h: torch.Tensor,
    meta: LoraKernelMeta,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Write planes of h that add up to `x[t] @ lora_a[s, i, :r].T` for the tokens of
    every segment, and return them: `h[:splits]`, where split k of the reduction over
    `in` stores its partial sums into plane k (`h[:splits].sum(0)[t, i, :r]` is the
    product).

    x `[T, in]`, lora_a `[S, n_slices, r_max, in]` (same dtype), h `[planes, T, n_slices,
    r_max]` float32 with at least as many planes as the launch splits (`MAX_SPLIT_K`
    always suffices; ValueError otherwise). Only entries `[:splits, t, i, :r]` of tokens
    with a slot are written; all other entries, and every entry of the planes past
    `splits`, keep whatever they held (no launch zero-fills h, none needs it zeroed).
    `config` overrides the heuristic tiles (for tuning).
    """
    if meta.num_segments == 0 or meta.max_rank == 0:
        return h[:1]
    _, n_slices, _, in_features = lora_a.shape
    cfg = config or cached_config(
        meta,
        ("sgmv_shrink", n_slices, in_features, x.dtype, x.device),
        lambda: shrink_config(x, lora_a, meta),
    )
    n_rows = n_slices * meta.max_rank
    split_k = cfg.splits(in_features)
    if split_k > h.shape[0]:
        raise ValueError(f"the shrink splits {split_k} ways but h has {h.shape[0]} planes")
    grid = (cdiv(n_rows, cfg.block_n) * split_k, num_tiles(meta, cfg.block_m))
    launch(
        _sgmv_shrink_kernel, grid,
        x, lora_a, h,
        meta.sorted_token_ids, meta.seg_starts, meta.seg_slots, meta.slot_ranks,
        meta.num_segments, in_features, meta.max_rank, n_rows,
        split_k, cfg.k_per_split(in_features),
        x.stride(0), x.stride(1),
        *lora_a.stride(),
        *h.stride(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(x.dtype), SEG_PAD=seg_pad(meta),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages if x.is_cuda else 1,
    )  # fmt: skip
    return h[:split_k]


def sgmv_expand(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: LoraKernelMeta,
    config: LaunchConfig | None = None,
) -> None:
    """`out[t, o_i:o_{i+1}] += h.sum(0)[t, i, :r] @ lora_b[s, o_i:o_{i+1}, :r].T`, in place.

    h `[splits, T, n_slices, r_max]` float32 as the shrink returned it (its planes are
    added up in float32 as they are loaded), lora_b `[S, total_out, r_max]`, out
    `[T, total_out]` (same dtype as lora_b). Only the rows of tokens with a slot are
    read or written, and of h only entries `[:, t, i, :r]`.
    """
    if meta.num_segments == 0 or meta.max_rank == 0:
        return
    total_out = out.shape[1]
    cfg = config or cached_config(
        meta, ("sgmv_expand", total_out, out.dtype, out.device), lambda: expand_config(out, meta)
    )
    grid = (cdiv(total_out, cfg.block_n), num_tiles(meta, cfg.block_m))
    launch(
        _sgmv_expand_kernel, grid,
        h, lora_b, out,
        meta.sorted_token_ids, meta.seg_starts, meta.seg_slots, meta.slot_ranks,
        meta.num_segments, total_out, *padded_offsets(slice_offsets), h.shape[0],
        *h.stride(),
        *lora_b.stride(),
        out.stride(0), out.stride(1),
        N_SLICES=len(slice_offsets) - 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_k, DOT_PRECISION=dot_precision(out.dtype),
        SEG_PAD=seg_pad(meta),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages if out.is_cuda else 1,
    )  # fmt: skip
