"""Entry points for multi-LoRA on one projection group: shrink, expand, add_lora.

A "group" is the projections that share an input (q/k/v, gate/up, o, down). Per step the
runner builds one `LoraKernelMeta`; every layer then calls `add_lora` right after its
base GEMM, which adds each token's own adapter delta into the GEMM output in place.

Backends: "triton" (CUDA tensors, or CPU tensors under the Triton interpreter) and
"torch" (the reference in `engine.kernels.reference`, used by the engine on the CPU).
Forms (Triton only, same math): "sgmv" tiles segments of tokens that share an adapter,
"bgmv" gives every token its own program. `choose_form` picks one per step.

The shrink's output h is float32 `[splits, T, n_slices, r_max]`: a Triton shrink may split
its reduction over `in` across programs, each writing its partial sums into its own
plane, and the expand adds the planes up as it reads them. No launch zero-fills h first
(a memset per group and layer otherwise). The shrink returns the planes it wrote, and
`add_lora` hands exactly that view to the expand, so both always agree on the count.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Literal

import torch

from engine.kernels import reference
from engine.kernels.meta import MAX_SLICES, LoraKernelMeta

Form = Literal["sgmv", "bgmv"]
Backend = Literal["triton", "torch"]

# SGMV reads an adapter's A/B once per tile of its tokens, where BGMV re-reads them per
# token; BGMV in turn never pads a lone token up to a 16-row tensor-core tile. Measured
# on an H200 at Llama-8B shapes (bench/bench_lora_kernels.py, device time per group):
# 1 token per adapter: BGMV 15-27 us vs SGMV 17-37; 2: even; 4: SGMV 17-26 vs BGMV 21-33;
# one 512-token chunk beside 31 single tokens: SGMV 26-81 vs BGMV 52-200; a 4096-token
# prefill: SGMV 44-180 vs BGMV 260-1310.
SGMV_MIN_AVG_SEGMENT = 3  # tokens per adapter, on average over the batch
SGMV_LONG_SEGMENT = 128  # one prefill chunk this long outweighs many lone tokens
# Most planes (reduction splits) one shrink writes: the launch heuristics never choose
# more, so a scratch h of this many planes serves every shrink.
MAX_SPLIT_K = 16


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def default_backend(device: torch.device | str) -> Backend:
    """The backend for tensors on `device`: Triton on CUDA when installed, else torch."""
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"


def shares_adapters(num_active: int, num_adapters: int) -> bool:
    """Whether `num_active` tokens with an adapter average `SGMV_MIN_AVG_SEGMENT` per
    distinct adapter: SGMV's one read of an adapter per tile then beats BGMV's one per
    token. The rule of eager steps (`choose_form`) and decode graphs alike."""
    return num_active >= SGMV_MIN_AVG_SEGMENT * num_adapters


def choose_form(meta: LoraKernelMeta) -> Form:
    """SGMV when adapters average `SGMV_MIN_AVG_SEGMENT` tokens in the batch or one has a
    `SGMV_LONG_SEGMENT`-token run (prefill, mixed batches); BGMV otherwise (decode)."""
    if meta.num_segments == 0:
        return "bgmv"
    if meta.max_seg_len >= SGMV_LONG_SEGMENT:
        return "sgmv"
    return "sgmv" if shares_adapters(meta.num_active, meta.num_segments) else "bgmv"


def _check_slices(slice_offsets: Sequence[int], n_slices: int, total_out: int) -> None:
    offs = list(slice_offsets)
    if len(offs) != n_slices + 1 or offs[0] != 0 or offs[-1] != total_out:
        raise ValueError(
            f"slice_offsets {offs} must run from 0 to total_out={total_out} "
            f"in {n_slices + 1} entries (one more than n_slices)"
        )
    if any(b < a for a, b in zip(offs[:-1], offs[1:], strict=True)):
        raise ValueError(f"slice_offsets {offs} must not decrease")
    if n_slices > MAX_SLICES:
        raise ValueError(f"at most {MAX_SLICES} slices per group, got {n_slices}")


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraKernelMeta) -> None:
    if x.dim() != 2 or lora_a.dim() != 4 or x.shape[1] != lora_a.shape[3]:
        raise ValueError(f"x {tuple(x.shape)} and lora_a {tuple(lora_a.shape)} do not match")
    if x.shape[0] != meta.num_tokens or lora_a.shape[0] != meta.num_slots:
        raise ValueError(
            f"meta is for {meta.num_tokens} tokens and {meta.num_slots} slots; "
            f"got x {tuple(x.shape)} and lora_a {tuple(lora_a.shape)}"
        )
    if x.dtype != lora_a.dtype or x.device != lora_a.device:
        raise ValueError(f"x ({x.dtype}, {x.device}) and lora_a ({lora_a.dtype}, {lora_a.device})")
    if meta.max_rank > lora_a.shape[2]:
        raise ValueError(f"a slot has rank {meta.max_rank} > r_max {lora_a.shape[2]}")


def new_scratch(
    num_tokens: int, n_slices: int, r_max: int, device: torch.device | str
) -> torch.Tensor:
    """An uninitialised scratch h for `lora_shrink` / `add_lora`: `[MAX_SPLIT_K, T,
    n_slices, r_max]` float32 (its contents never matter: no launch reads stale data)."""
    return torch.empty(MAX_SPLIT_K, num_tokens, n_slices, r_max, dtype=torch.float32, device=device)


def _check_h(h: torch.Tensor, num_tokens: int, n_slices: int, r_max: int) -> None:
    want = (MAX_SPLIT_K, num_tokens, n_slices, r_max)
    if h.shape != want or h.dtype != torch.float32:
        raise ValueError(f"h must be {list(want)} float32, got {tuple(h.shape)} {h.dtype}")


def _check_expand(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: LoraKernelMeta,
) -> None:
    if h.dim() != 4 or lora_b.dim() != 3 or out.dim() != 2:
        raise ValueError("expected h [splits, T, n_slices, r_max], lora_b 3-D, out 2-D")
    if h.dtype != torch.float32 and not (h.dtype == out.dtype and h.shape[0] == 1):
        raise ValueError(f"h must be float32, or one plane in out's dtype; got {h.dtype}")
    if not 1 <= h.shape[0] <= MAX_SPLIT_K:
        raise ValueError(f"h has {h.shape[0]} planes, expected 1 to {MAX_SPLIT_K}")
    if h.shape[1] != meta.num_tokens or out.shape[0] != meta.num_tokens:
        raise ValueError(f"h {tuple(h.shape)} / out {tuple(out.shape)} vs {meta.num_tokens} tokens")
    if lora_b.shape[0] != meta.num_slots or lora_b.shape[1] != out.shape[1]:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} does not match out {tuple(out.shape)}")
    if lora_b.shape[2] != h.shape[3] or lora_b.dtype != out.dtype:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} {lora_b.dtype} vs h/out")
    _check_slices(slice_offsets, h.shape[2], out.shape[1])


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    meta: LoraKernelMeta,
    form: Form | None = None,
    *,
    backend: Backend = "triton",
    h: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return h `[splits, T, n_slices, r_max]` float32, planes that add up to the product:
    `h.sum(0)[t, i, :r] = x[t] @ lora_a[s, i, :r].T`.

    x `[T, in]` and lora_a `[S, n_slices, r_max, in]` share dtype and device; s and r are
    token t's slot and that slot's rank. Only those entries are defined: the rest of h
    (ranks beyond r, tokens with slot -1) is unspecified and never read by `lora_expand`.
    `splits` (1 to `MAX_SPLIT_K`; always 1 for the torch backend) is how many ways the
    launch split its reduction; pass the returned h to `lora_expand` as it is. `h` is an
    optional scratch of `MAX_SPLIT_K` planes (`new_scratch`), reused across layers;
    the result is a view of its leading planes. `form` None means `choose_form(meta)`.
    """
    _check_shrink(x, lora_a, meta)
    num_tokens = x.shape[0]
    _, n_slices, r_max, _ = lora_a.shape
    if h is not None:
        _check_h(h, num_tokens, n_slices, r_max)
    if backend == "torch":
        if h is None:
            h = torch.zeros(1, num_tokens, n_slices, r_max, dtype=torch.float32, device=x.device)
        reference.shrink_ref(x, lora_a, meta, h[0])
        return h[:1]
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}: expected 'triton' or 'torch'")
    form = form or choose_form(meta)
    if form == "sgmv":
        from engine.kernels.sgmv import sgmv_shrink as launch
    elif form == "bgmv":
        from engine.kernels.bgmv import bgmv_shrink as launch
    else:
        raise ValueError(f"unknown form {form!r}: expected 'sgmv' or 'bgmv'")
    if h is None:
        h = new_scratch(num_tokens, n_slices, r_max, x.device)
    return launch(x, lora_a, h, meta)


def lora_expand(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: LoraKernelMeta,
    form: Form | None = None,
    *,
    backend: Backend = "triton",
) -> None:
    """`out[t, o_i:o_{i+1}] += h.sum(0)[t, i, :r] @ lora_b[s, o_i:o_{i+1}, :r].T` in place.

    h `[splits, T, n_slices, r_max]` float32 as `lora_shrink` returns it (the planes are
    added up in float32 as they are read), or one plane in out's dtype (a shrink folded
    into the base GEMM, `engine.model.lora_hook`); lora_b `[S, total_out, r_max]`
    with scaling folded in; out `[T, total_out]` in lora_b's dtype; `slice_offsets` has
    n_slices + 1 entries from 0 to total_out. The sum is formed in float32 and rounded
    once to out's dtype. Rows of tokens with slot -1 are neither read nor written.
    """
    _check_expand(h, lora_b, out, slice_offsets, meta)
    if backend == "torch":
        planes = (h[0] if h.shape[0] == 1 else h.sum(0)).float()  # [T, n_slices, r_max]
        reference.expand_ref(planes, lora_b, out, slice_offsets, meta)
        return
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}: expected 'triton' or 'torch'")
    form = form or choose_form(meta)
    if form == "sgmv":
        from engine.kernels.sgmv import sgmv_expand

        sgmv_expand(h, lora_b, out, slice_offsets, meta)
    elif form == "bgmv":
        from engine.kernels.bgmv import bgmv_expand

        bgmv_expand(h, lora_b, out, slice_offsets, meta)
    else:
        raise ValueError(f"unknown form {form!r}: expected 'sgmv' or 'bgmv'")


def add_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: Sequence[int],
    meta: LoraKernelMeta,
    *,
    backend: Backend = "triton",
    form: Form | None = None,
    h: torch.Tensor | None = None,
) -> None:
    """Add every token's LoRA delta for one projection group into `out` in place.

    `out[t, o_i:o_{i+1}] += (x[t] @ A[s, i, :r].T) @ B[s, o_i:o_{i+1}, :r].T` for each
    token t with slot s (rank r); rows of tokens with slot -1 stay bit-identical.
    Shapes as in `lora_shrink` / `lora_expand`; `h` is an optional scratch of
    `MAX_SPLIT_K` planes (`new_scratch`), used by the Triton backend only.
    """
    if meta.num_active == 0:
        return
    if backend == "torch":
        _check_shrink(x, lora_a, meta)
        if lora_b.shape[:2] != (lora_a.shape[0], out.shape[1]) or out.shape[0] != x.shape[0]:
            raise ValueError(f"lora_b {tuple(lora_b.shape)} / out {tuple(out.shape)} mismatch")
        _check_slices(slice_offsets, lora_a.shape[1], out.shape[1])
        reference.add_lora_ref(x, lora_a, lora_b, out, slice_offsets, meta)
        return
    form = form or choose_form(meta)
    h = lora_shrink(x, lora_a, meta, form, backend=backend, h=h)
    lora_expand(h, lora_b, out, slice_offsets, meta, form, backend=backend)
