"""Plain-torch multi-LoRA shrink/expand: the reference beside the Triton kernels.

The engine runs these on the CPU; the tests hold the Triton kernels to them. One
loop over the segments of `LoraKernelMeta` (one per distinct adapter slot present),
each a pair of dense matmuls in float32, so the cost is that of the tokens that carry
an adapter and tokens with slot -1 are never read or written. The math is the same for
both kernel forms (SGMV and BGMV only differ in how the GPU work is scheduled), so one
reference serves both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from engine.kernels.meta import LoraKernelMeta


def _segments(meta: LoraKernelMeta) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield `(slot, rank, token_ids)` for every segment with a non-zero rank."""
    starts = meta.seg_starts_host
    for g, (slot, rank) in enumerate(zip(meta.seg_slots_host, meta.seg_ranks_host, strict=True)):
        if rank == 0:
            continue
        token_ids = meta.sorted_token_ids[starts[g] : starts[g + 1]].long()  # [n] int64
        yield slot, rank, token_ids


def shrink_ref(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    meta: LoraKernelMeta,
    h: torch.Tensor | None = None,
) -> torch.Tensor:
    """`h[t, i, :r] = x[t] @ lora_a[s, i, :r].T` in float32 for every token with a slot.

    x: `[T, in]`; lora_a: `[S, n_slices, r_max, in]`; returns h `[T, n_slices, r_max]`
    float32 (written into `h` when given). Entries at or beyond a token's rank, and the
    rows of tokens without a slot, are zero in a fresh h and left untouched in a given one.
    """
    num_tokens = x.shape[0]
    _, n_slices, r_max, in_features = lora_a.shape
    if h is None:
        h = torch.zeros(num_tokens, n_slices, r_max, dtype=torch.float32, device=x.device)
    for slot, rank, token_ids in _segments(meta):
        xs = x.index_select(0, token_ids).float()  # [n, in] f32
        a = lora_a[slot, :, :rank, :].float().reshape(n_slices * rank, in_features)
        hs = (xs @ a.T).view(-1, n_slices, rank)  # [n, n_slices, rank] f32
        h[token_ids, :, :rank] = hs
    return h


def expand_ref(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: LoraKernelMeta,
) -> None:
    """`out[t, o_i:o_{i+1}] += h[t, i, :r] @ lora_b[s, o_i:o_{i+1}, :r].T`, in place.

    h: `[T, n_slices, r_max]` float32; lora_b: `[S, total_out, r_max]`; out:
    `[T, total_out]`. The sum is formed in float32 and rounded once to out's dtype.
    Only entries `h[t, i, :rank]` of tokens with a slot are read.
    """
    n_slices = len(slice_offsets) - 1
    for slot, rank, token_ids in _segments(meta):
        hs = h.index_select(0, token_ids)[:, :, :rank]  # [n, n_slices, rank] f32
        acc = out.index_select(0, token_ids).float()  # [n, total_out] f32
        for i in range(n_slices):
            lo, hi = slice_offsets[i], slice_offsets[i + 1]
            b = lora_b[slot, lo:hi, :rank].float()  # [hi - lo, rank] f32
            acc[:, lo:hi] += hs[:, i, :] @ b.T
        out.index_copy_(0, token_ids, acc.to(out.dtype))


def add_lora_ref(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: LoraKernelMeta,
) -> None:
    """Shrink then expand for every segment, without materialising a `[T, ...]` h."""
    _, n_slices, _, in_features = lora_a.shape
    for slot, rank, token_ids in _segments(meta):
        xs = x.index_select(0, token_ids).float()  # [n, in] f32
        a = lora_a[slot, :, :rank, :].float().reshape(n_slices * rank, in_features)
        hs = (xs @ a.T).view(-1, n_slices, rank)  # [n, n_slices, rank] f32
        acc = out.index_select(0, token_ids).float()  # [n, total_out] f32
        for i in range(n_slices):
            lo, hi = slice_offsets[i], slice_offsets[i + 1]
            acc[:, lo:hi] += hs[:, i, :] @ lora_b[slot, lo:hi, :rank].float().T
        out.index_copy_(0, token_ids, acc.to(out.dtype))
