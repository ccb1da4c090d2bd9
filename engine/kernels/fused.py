"""Triton kernels that fuse the small element-wise steps of a decoder layer.

A decode step of an 8B model spends most of its non-GEMM time launching tiny kernels:
eager torch writes RMSNorm as seven launches, RoPE as about twenty (per layer, for q
and k), SiLU-and-multiply as two. Each of these does a few microseconds of work, so
at batch sizes where the step is bound by memory bandwidth their launch latency is
what costs. Here each becomes one launch:

- `add_rms_norm(x, residual, weight, eps)`: `residual += x` (rounded to the residual's
  dtype, as torch's `h + x` does), then RMSNorm of the sum; `residual=None` norms `x`.
- `rope_qk_(q, k, positions, cos, sin, store)`: rotate-half RoPE applied to q and k in
  place, cos/sin rows gathered by position inside the kernel; with `store`, the rotated
  k and v are written into the paged KV cache by the same launch.
- `silu_and_mul(gate_up)`: `silu(gate) * up` for a fused `[T, 2*I]` projection.

Rounding follows the torch code in `engine.model.llama` / `engine.model.rope` at every
step where that code rounds to the activation dtype, except inside RoPE, which is
computed in float32 and rounded once (at most one bf16 ulp from the torch version; in
float32, the dtype of the parity tests, both are the same math).

Only imported when Triton is: the model falls back to its torch code elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.kernels.compile_ahead import launch


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    stride_x, stride_r, stride_o,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of `x + residual` (or of `x`), one launch.

    x `[T, N]`, residual `[T, N]` (updated in place to `x + residual`) or None, weight
    `[N]`; returns the normed rows `[T, N]` in x's dtype. Rows must be contiguous.
    """
    num_rows, n_cols = x.shape
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("add_rms_norm needs rows with contiguous columns")
    out = torch.empty_like(x)
    if num_rows == 0:
        return out
    block = triton.next_power_of_2(n_cols)
    res = residual if residual is not None else x
    launch(
        _add_rms_norm_kernel, (num_rows,),
        x, res, weight, out,
        x.stride(0), res.stride(0), out.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_ckv, stride_cblock, stride_cslot, stride_chead,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    STORE: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    d_mask = offs_d < HALF
    # Like transformers, cos/sin are cast to the activation dtype before the rotation.
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0)
    cos = cos.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    offs_h = tl.arange(0, HEADS_PAD)
    kv_mask = (offs_h < NUM_K_HEADS)[:, None] & d_mask[None, :]
    if STORE:  # this token's cache row: [KVH, D] at its slot, keys then (+stride_ckv) values
        slot = tl.load(slot_ptr + token).to(tl.int64)
        cache_row = (
            cache_ptr + (slot // BLOCK_SIZE) * stride_cblock + (slot % BLOCK_SIZE) * stride_cslot
            + offs_h[:, None] * stride_chead + offs_d[None, :]
        )  # fmt: skip
    for which in tl.static_range(2):
        if which == 0:
            base, stride_t, stride_h, num_heads = q_ptr, stride_qt, stride_qh, NUM_Q_HEADS
        else:
            base, stride_t, stride_h, num_heads = k_ptr, stride_kt, stride_kh, NUM_K_HEADS
        mask = (offs_h < num_heads)[:, None] & d_mask[None, :]
        ptrs = base + token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = (x1 * cos - x2 * sin).to(base.dtype.element_ty)
        o2 = (x2 * cos + x1 * sin).to(base.dtype.element_ty)
        tl.store(ptrs, o1, mask=mask)
        tl.store(ptrs + HALF, o2, mask=mask)
        if STORE and which == 1:
            tl.store(cache_row, o1.to(cache_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(cache_row + HALF, o2.to(cache_ptr.dtype.element_ty), mask=kv_mask)
    if STORE:
        v_row = v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        for half in tl.static_range(2):
            v = tl.load(v_row + half * HALF, mask=kv_mask, other=0.0)
            tl.store(
                cache_row + stride_ckv + half * HALF,
                v.to(cache_ptr.dtype.element_ty),
                mask=kv_mask,
            )


def rope_qk_(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    cos: Tensor,
    sin: Tensor,
    store: tuple[Tensor, Tensor, Tensor] | None = None,
) -> None:
    """Rotate q `[T, H, D]` and k `[T, KVH, D]` in place by RoPE at `positions` `[T]`.

    cos/sin `[max_pos, D/2]` float32 tables (rotate-half layout). q and k may be strided
    views (e.g. of a fused qkv output) but each head's D values must be contiguous.
    `store = (v, kv_layer, slot_mapping)` also writes the rotated k and v `[T, KVH, D]`
    into the paged cache `kv_layer [2, num_blocks, block_size, KVH, D]` at each token's
    slot, as `engine.attention.write_kv` would: the same launch.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1:
        raise ValueError("rope_qk_ needs each head's values contiguous")
    if num_tokens == 0:
        return
    if store is None:
        v, cache, slots = k, k, positions  # unused stand-ins (STORE is off)
        cache_strides = (0, 0, 0, 0)
        block_size = 1
    else:
        v, cache, slots = store
        if v.stride(2) != 1 or cache.stride(4) != 1 or cache.shape[-2:] != k.shape[1:]:
            raise ValueError("rope_qk_ store needs contiguous heads and a matching cache")
        cache_strides = (cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3))
        block_size = cache.shape[2]
    half = head_dim // 2
    launch(
        _rope_kernel, (num_tokens,),
        q, k, v, positions, slots, cos, sin, cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), *cache_strides,
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads,
        HEADS_PAD=triton.next_power_of_2(max(num_q_heads, num_k_heads)),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), BLOCK_SIZE=block_size,
        STORE=store is not None,
        num_warps=4,
    )  # fmt: skip


@triton.jit
def _silu_and_mul_kernel(
    gu_ptr, out_ptr, stride_gu, stride_o, n_cols, BLOCK: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + offs, mask=mask, other=0.0)
    # As torch: silu(gate) rounded to the dtype, then the product rounded again.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(
        out_ptr + row * stride_o + offs,
        (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """`silu(gate) * up` of gate_up `[T, 2*I]` (gate columns first) -> `[T, I]`."""
    num_rows, width = gate_up.shape
    n_cols = width // 2
    if gate_up.stride(1) != 1:
        raise ValueError("silu_and_mul needs rows with contiguous columns")
    out = gate_up.new_empty((num_rows, n_cols))
    if num_rows == 0:
        return out
    block = min(1024, triton.next_power_of_2(n_cols))
    launch(
        _silu_and_mul_kernel, (num_rows, triton.cdiv(n_cols, block)),
        gate_up, out, gate_up.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4
    )  # fmt: skip
    return out
