"""Triton varlen flash-attention over the paged KV cache: one launch for a whole flat batch.

Every sequence of the batch (prefill chunks of any length, over a cached prefix or not,
and single decode tokens) is served by the same launch. A program owns one query tile
of one sequence and one kv head: its rows are `BLOCK_M // GROUP` consecutive tokens
times the `GROUP` query heads that share that kv head, so GQA reads each K/V row once
per kv head and never repeats it. Keys and values are read in place from the paged
cache through the block table (the new tokens' k/v must already be written there);
causal masking comes from positions, the softmax is online in float32.

Programs map to (sequence, tile) without a host-side table: sequence `s` owns the
program range starting at `query_start_loc[s] // BLOCK_Q + s`, which grows strictly
with `s`, so each program finds its sequence by a binary search over `query_start_loc`
and programs past a sequence's last tile exit at once. The grid depends only on the
token and sequence counts, so a launch needs no host sync and no device->host reads.

Contract: `1 <= q_len(s) <= context_lens[s]` for every sequence, and the block table
row of `s` covers `context_lens[s]` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.kernels.compile_ahead import launch

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    """Launch shape: `block_m` rows (tokens x group heads) per program, `block_n` keys
    per inner step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def choose_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    """A fixed launch shape per head size and dtype (no autotuning: nothing to re-run
    at capture time, and the first step of a server is not a benchmark)."""
    if device.type != "cuda":
        return PrefillConfig(32, 32, 4, 1)  # the interpreter: small tiles are fastest
    if dtype == torch.float32:
        return PrefillConfig(64, 32, 4, 2)
    if head_dim <= 64:
        return PrefillConfig(128, 64, 4, 3)
    if head_dim <= 128:
        return PrefillConfig(128, 64, 8, 2)
    return PrefillConfig(64, 32, 8, 2)


@triton.jit
def _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s with `query_start_loc[s] // BLOCK_Q + s <= tile`."""
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first_tile = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first_tile <= tile, mid, lo)
        hi = tl.where(first_tile <= tile, hi, mid)
    return lo


@triton.jit
def _attend_key_tile(
    q, m_i, l_i, acc, start, qpos, last_pos, table_row, kv_ptr, kv_head_off, offs_d,
    d_mask, qk_scale,
    stride_kv, stride_kb, stride_ks, stride_kd, stride_tn,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over keys `start .. start + BLOCK_N`. Without CAUSAL every
    key is at or before every row's position (no mask, no bounds); with it, keys past
    `last_pos` are not loaded and a row sees only keys at or before its own position."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if CAUSAL:
        n_mask = offs_n <= last_pos
        block = tl.load(table_row + (offs_n // BLOCK_SIZE) * stride_tn, mask=n_mask, other=0)
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        block = tl.load(table_row + (offs_n // BLOCK_SIZE) * stride_tn)
        kv_mask = d_mask[None, :]
    rows = block.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks
    k_ptrs = kv_ptr + kv_head_off + rows[:, None] + offs_d[None, :] * stride_kd
    if CAUSAL or not EVEN_D:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    else:
        k = tl.load(k_ptrs)  # the hot path: no mask at all, fully vectorized loads
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 units
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= qpos[:, None], s, float("-inf"))
    # Every row sees key 0 on the first step, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N] float32
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if CAUSAL or not EVEN_D:
        v = tl.load(k_ptrs + stride_kv, mask=kv_mask, other=0.0)
    else:
        v = tl.load(k_ptrs + stride_kv)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Ints that change from step to step are not specialised on: else each new value class
# (1, a multiple of 16, other) compiles another variant while requests wait.
@triton.jit(do_not_specialize=["num_seqs", "num_programs", "stride_tb"])
def _varlen_paged_kernel(
    q_ptr, kv_ptr, out_ptr, block_tables_ptr, qsl_ptr, context_lens_ptr,
    num_seqs, num_programs, qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kv, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_tb, stride_tn,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP  # tokens per query tile
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM  # no head-dim padding to mask
    # Reversed: a sequence's last tiles see the most keys, so they start first.
    tile = num_programs - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q)
    q_begin = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_begin
    tile_start = (tile - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if tile_start >= q_len:
        return  # a spare program of this sequence
    prefix = tl.load(context_lens_ptr + seq) - q_len  # cached tokens before the chunk
    tile_end = tl.minimum(tile_start + BLOCK_Q, q_len)
    first_pos = prefix + tile_start
    last_pos = prefix + tile_end - 1

    offs_m = tl.arange(0, BLOCK_M)
    token = tile_start + offs_m // GROUP  # index within the sequence's chunk
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m // GROUP < BLOCK_Q) & (token < tile_end)
    # Rows outside the tile are never stored; clamping keeps their softmax finite.
    qpos = tl.minimum(prefix + token, last_pos)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_off = (q_begin + token).to(tl.int64) * stride_qt + head * stride_qh
    io_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + row_off[:, None] + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0
    )  # [BLOCK_M, BLOCK_D]

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_tb
    kv_head_off = kv_head.to(tl.int64) * stride_kh
    # Key tiles wholly at or before the tile's first position need no mask; the rest up
    # to its last position are masked; tiles wholly above the diagonal are never visited.
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_key_tile(
            q, m_i, l_i, acc, start, qpos, last_pos, table_row, kv_ptr, kv_head_off,
            offs_d, d_mask, qk_scale,
            stride_kv, stride_kb, stride_ks, stride_kd, stride_tn,
            BLOCK_N, BLOCK_SIZE, False, EVEN_D, DOT_PRECISION,
        )  # fmt: skip
    for start in range(full_end, last_pos + 1, BLOCK_N):
        m_i, l_i, acc = _attend_key_tile(
            q, m_i, l_i, acc, start, qpos, last_pos, table_row, kv_ptr, kv_head_off,
            offs_d, d_mask, qk_scale,
            stride_kv, stride_kb, stride_ks, stride_kd, stride_tn,
            BLOCK_N, BLOCK_SIZE, True, EVEN_D, DOT_PRECISION,
        )  # fmt: skip

    out = acc / l_i[:, None]
    o_off = (q_begin + token).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + o_off[:, None] + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


def varlen_paged_attention(
    q: Tensor,  # [T, H, D]
    kv_layer: Tensor,  # [2, num_blocks, block_size, KVH, D], new k/v already written
    block_tables: Tensor,  # [num_seqs, max_blocks] int32 or int64
    query_start_loc: Tensor,  # [num_seqs + 1] int32, query_start_loc[-1] == T
    context_lens: Tensor,  # [num_seqs] int32: cached tokens after this step
    scale: float,
    out: Tensor | None = None,  # [T, H, D]; written in place when given
    config: PrefillConfig | None = None,
) -> Tensor:  # [T, H, D] in q's dtype
    """Causal attention of every new token of the flat batch over its own sequence's
    first `context_lens[s]` cached tokens: token i of a chunk of q_len sits at
    position `context_lens[s] - q_len + i`. One launch; no host sync."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, kv_dim = kv_layer.shape
    if kv_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_layer {tuple(kv_layer.shape)}")
    num_seqs = context_lens.shape[0]
    if block_tables.shape[0] != num_seqs or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError("block_tables, query_start_loc and context_lens disagree on num_seqs")
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    cfg = config or choose_config(head_dim, q.dtype, q.device)
    block_m = max(cfg.block_m, triton.next_power_of_2(group))
    # Sequence s gets programs [qsl[s] // block_q + s, qsl[s+1] // block_q + s + 1): at
    # least ceil(q_len / block_q) of them, and num_tokens // block_q + num_seqs in all.
    num_programs = num_tokens // (block_m // group) + num_seqs
    launch(
        _varlen_paged_kernel, (num_programs, num_kv_heads),
        q, kv_layer, out, block_tables, query_start_loc, context_lens,
        num_seqs, num_programs, scale * _LOG2E,
        *q.stride(),
        *kv_layer.stride(),
        *block_tables.stride(),
        *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
