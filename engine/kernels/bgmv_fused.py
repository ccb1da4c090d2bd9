"""Fused BGMV for decode: shrink and expand of one projection group in ONE launch.

At decode the separate BGMV shrink/expand are latency-bound (a memset of h, a split-K
shrink with atomics, an expand: three launches per group, each a few dependent memory
round trips). Here each program serves one (token, output chunk) pair: it computes the
token's rank vector `h = A[s, i, :r] @ x[t]` for its slice i in float32 registers, then
adds `B[s, rows, :r] @ h` into its chunk of output rows. No h in memory, no atomics.

The programs that share a (token, slice) each recompute the same h; their A reads hit L2
(they run at the same time), which is why a chunk is kept at least a quarter of `in`
rows long (`fused_config`). Grid: (token, chunk of any slice), the chunks of all slices
numbered in order, so its size depends only on T, the slice sizes and the config; slots
and ranks are read from device memory, so one launch is valid in a CUDA graph for any
mix of adapters (slot -1 rows return at once and are neither read nor written).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.meta import MAX_SLICES, LoraKernelMeta
from engine.kernels.triton_common import cdiv, next_pow2, padded_offsets, sm_count

A_TILE_BYTES = 32768  # one [BLOCK_R, BLOCK_K] tile of A in flight per loop step
B_TILE_BYTES = 16384  # one [BLOCK_N, BLOCK_R] tile of B per loop step
PROGRAMS_PER_SM = 2  # grid target at decode: every SM busy, little tail
MIN_CHUNK_ROWS = 256


@triton.jit
def _bgmv_fused_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr,
    sorted_ids_ptr, token_slots_ptr, slot_ranks_ptr,
    in_features, chunk_rows,
    o0, o1, o2, o3, o4, c1, c2, c3,
    stride_xt, stride_xk,
    stride_as, stride_ai, stride_ar, stride_ak,
    stride_bs, stride_bn, stride_br,
    stride_ot, stride_on,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    tok = tl.load(sorted_ids_ptr + tl.program_id(0)).to(tl.int64)
    slot = tl.load(token_slots_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    rank = tl.load(slot_ranks_ptr + slot)
    if rank == 0:
        return
    # Axis 1 numbers the chunks of all slices in order; c_i = chunks before slice i
    # (padded with the total, so the comparisons never pick a missing slice).
    pid = tl.program_id(1)
    i = (pid >= c1).to(tl.int32) + (pid >= c2).to(tl.int32) + (pid >= c3).to(tl.int32)
    first = tl.where(i == 0, 0, tl.where(i == 1, c1, tl.where(i == 2, c2, c3)))
    lo = tl.where(i == 0, o0, tl.where(i == 1, o1, tl.where(i == 2, o2, o3)))
    hi = tl.where(i == 0, o1, tl.where(i == 1, o2, tl.where(i == 2, o3, o4)))
    row0 = lo + (pid - first) * chunk_rows
    row_end = tl.minimum(row0 + chunk_rows, hi)

    # Shrink: h = A[s, i, :rank] @ x[t]. Rank rows past the slot's rank are never
    # loaded. A 2-D accumulator keeps the loop free of cross-thread reductions.
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_rows = a_ptr + slot * stride_as + i.to(tl.int64) * stride_ai + offs_r[:, None] * stride_ar
    x_row = x_ptr + tok * stride_xt
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        xk = tl.load(x_row + offs_k * stride_xk, mask=k_mask, other=0.0)
        at = tl.load(
            a_rows + offs_k[None, :] * stride_ak, mask=r_mask[:, None] & k_mask[None, :], other=0.0
        )  # [BLOCK_R, BLOCK_K]
        acc += at.to(tl.float32) * xk.to(tl.float32)[None, :]
    h = tl.sum(acc, axis=1)  # [BLOCK_R] f32, zero past the rank

    # Expand: out[t, rows] += B[s, rows, :rank] @ h, formed in f32, rounded once.
    offs_n = tl.arange(0, BLOCK_N)
    b_cols = b_ptr + slot * stride_bs + offs_r[None, :] * stride_br
    out_row = out_ptr + tok * stride_ot
    for n0 in range(row0, row_end, BLOCK_N):
        rows = n0 + offs_n
        n_mask = rows < row_end
        bt = tl.load(
            b_cols + rows[:, None] * stride_bn, mask=n_mask[:, None] & r_mask[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_R]
        delta = tl.sum(bt.to(tl.float32) * h[None, :], axis=1)
        o_ptrs = out_row + rows * stride_on
        base = tl.load(o_ptrs, mask=n_mask, other=0.0)
        tl.store(o_ptrs, (base.to(tl.float32) + delta).to(base.dtype), mask=n_mask)


@dataclass(frozen=True)
class FusedConfig:
    """Tiles and chunking of one fused launch.

    block_r: rank padding (a power of two >= the batch's max rank). block_k: `in`
    columns of A per shrink step. block_n: output rows per expand step. chunk_rows:
    output rows per program (the last chunk of a slice may be shorter).
    """

    block_r: int
    block_k: int
    block_n: int
    chunk_rows: int
    num_warps: int = 8
    num_stages: int = 2

    def chunk_counts(self, slice_sizes: Sequence[int]) -> list[int]:
        """Chunks (programs per token) of each slice."""
        return [cdiv(size, self.chunk_rows) for size in slice_sizes]


def fused_config(
    num_tokens: int,
    slice_sizes: Sequence[int],
    in_features: int,
    max_rank: int,
    elt_bytes: int,
    num_sms: int,
) -> FusedConfig:
    """Heuristic config from plain integers (no torch, no device): a pure function of
    the launch's shapes, so a CUDA graph's grid never changes between replays.

    Tiles hold ~32 KiB of A and ~16 KiB of B. Chunks aim at `PROGRAMS_PER_SM` programs
    per SM over the batch, but stay at least a quarter of `in_features` rows (each
    chunk re-reads its slice's A, as long as `in` rows of B) and `MIN_CHUNK_ROWS`; the
    largest slice is then cut into equal chunks of whole `block_n` steps. `num_sms` 1
    (the interpreter) gives few, large programs.
    """
    if num_tokens <= 0 or not slice_sizes or in_features <= 0 or max_rank <= 0:
        raise ValueError(
            f"bad fused launch: {num_tokens} tokens, slices {list(slice_sizes)}, "
            f"in {in_features}, rank {max_rank}"
        )
    block_r = next_pow2(max_rank)
    block_k = min(next_pow2(in_features, 32), max(32, A_TILE_BYTES // elt_bytes // block_r))
    block_n = max(32, min(1024, B_TILE_BYTES // elt_bytes // block_r))
    per_token = max(1, PROGRAMS_PER_SM * num_sms // num_tokens)
    rows = max(cdiv(sum(slice_sizes), per_token), in_features // 4, MIN_CHUNK_ROWS)
    largest = max(max(slice_sizes), 1)
    rows = cdiv(largest, cdiv(largest, rows))  # equal chunks of the largest slice
    block_n = min(block_n, next_pow2(rows, 32))
    chunk_rows = cdiv(rows, block_n) * block_n
    return FusedConfig(block_r, block_k, block_n, chunk_rows)


def default_config(
    lora_a: torch.Tensor, out: torch.Tensor, slice_offsets: Sequence[int], meta: LoraKernelMeta
) -> FusedConfig:
    """`fused_config` for these tensors and this step's meta."""
    _, _, _, in_features = lora_a.shape
    sizes = [b - a for a, b in zip(slice_offsets[:-1], slice_offsets[1:], strict=True)]
    return fused_config(
        meta.num_tokens, sizes, in_features, meta.max_rank, out.element_size(), sm_count(out.device)
    )


def bgmv_fused_add(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: LoraKernelMeta,
    config: FusedConfig | None = None,
) -> None:
    """`out[t, o_i:o_{i+1}] += (x[t] @ lora_a[s, i, :r].T) @ lora_b[s, o_i:o_{i+1}, :r].T`
    in place, for every token t with slot s >= 0 (rank r = `meta.slot_ranks[s]`, read on
    the device), in one launch.

    x `[T, in]`, lora_a `[S, n_slices, r_max, in]`, lora_b `[S, total_out, r_max]`,
    out `[T, total_out]`, all one dtype and device (the caller checks: `add_lora`).
    The sum is formed in float32 and rounded once to out's dtype; rows of tokens with
    slot -1 (or a rank-0 slot) are neither read nor written. The grid depends only on
    `meta.num_tokens`, `meta.max_rank`, the shapes and `config`, so the launch can be
    captured in a CUDA graph whose slot/rank buffers are refilled between replays.
    `config` None: `fused_config`, memoised in `meta.launch_cache`.
    """
    if meta.num_active == 0 or meta.max_rank == 0 or out.shape[1] == 0:
        return
    n_slices = len(slice_offsets) - 1
    if not 1 <= n_slices <= MAX_SLICES:
        raise ValueError(f"1 to {MAX_SLICES} slices per group, got offsets {list(slice_offsets)}")
    if config is None:
        key = ("bgmv_fused", tuple(slice_offsets), lora_a.shape[3], out.dtype, out.device)
        config = meta.launch_cache.get(key)
        if config is None:
            config = meta.launch_cache[key] = default_config(lora_a, out, slice_offsets, meta)
    if config.block_r < meta.max_rank:
        raise ValueError(f"config block_r {config.block_r} < max rank {meta.max_rank}")
    sizes = [b - a for a, b in zip(slice_offsets[:-1], slice_offsets[1:], strict=True)]
    counts = config.chunk_counts(sizes)
    # Chunks before slices 1..3; past the last slice (and after an empty one) the sums
    # stop growing, which is the padding the kernel's slice lookup expects.
    starts = [sum(counts[:j]) for j in range(1, MAX_SLICES)]
    grid = (meta.num_tokens, sum(counts))
    _bgmv_fused_kernel[grid](
        x, lora_a, lora_b, out,
        meta.sorted_token_ids, meta.token_slots, meta.slot_ranks,
        lora_a.shape[3], config.chunk_rows,
        *padded_offsets(slice_offsets), *starts,
        x.stride(0), x.stride(1),
        *lora_a.stride(),
        *lora_b.stride(),
        out.stride(0), out.stride(1),
        BLOCK_R=config.block_r, BLOCK_K=config.block_k, BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages if out.is_cuda else 1,
    )  # fmt: skip
