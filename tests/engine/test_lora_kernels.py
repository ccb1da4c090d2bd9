"""Multi-LoRA kernels: Triton SGMV/BGMV vs the torch reference vs a float64 dense sum.

On a machine without CUDA the Triton kernels run under the Triton interpreter at small
float32 shapes. Triton decides between compiling and interpreting when a kernel is
defined (`@triton.jit` at import of `engine.kernels.sgmv` / `.bgmv`), so this module
sets `TRITON_INTERPRET=1` before anything can import them, and only without CUDA.
The `gpu` test runs the same comparisons in bf16 at Llama-3.1-8B shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.kernels import (  # noqa: E402
    LoraKernelMeta,
    add_lora,
    build_meta,
    choose_form,
    lora_expand,
    lora_shrink,
)
from engine.kernels.lora_ops import MAX_SPLIT_K, Backend, Form, new_scratch  # noqa: E402
from engine.kernels.reference import add_lora_ref, expand_ref, shrink_ref  # noqa: E402
from tests.triton_skip import triton_skip_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAN = float("nan")


_SKIP = triton_skip_reason("engine.kernels.sgmv", "_sgmv_shrink_kernel")
needs_triton = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@dataclass(frozen=True)
class Case:
    name: str
    in_features: int
    slice_sizes: tuple[int, ...]
    r_max: int
    slot_ranks: tuple[int, ...]
    token_slots: tuple[int, ...]

    @property
    def offsets(self) -> list[int]:
        offs = [0]
        for size in self.slice_sizes:
            offs.append(offs[-1] + size)
        return offs


def _scattered(pattern: list[int], num_tokens: int, seed: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(pattern), (num_tokens,), generator=gen)
    return tuple(pattern[i] for i in idx.tolist())


CASES = [
    # q/k/v-like unequal slices, odd ranks mixed in one batch, tokens of an adapter
    # scattered among others and among base-model tokens, slots 4 and 5 absent.
    Case(
        "qkv_mixed", 80, (64, 32, 32), 16, (3, 7, 13, 16, 5, 9), _scattered([-1, 0, 1, 2, 3], 40, 1)
    ),
    # Decode: single-token segments, one adapter per token, one slot empty (rank 0).
    Case("o_decode", 64, (48,), 8, (1, 3, 7, 8, 5, 2, 0, 4), (6, 3, -1, 0, 7, 1, -1, 4, 2, 5)),
    # gate/up-like: one long segment spanning several token blocks, slices that are not
    # multiples of any block size, so an output block straddles both slices.
    Case("gate_up_long", 48, (40, 24), 32, (32, 1), _scattered([0, 0, 0, 0, 0, 0, -1, 1], 75, 2)),
    # Ranks up to 128 (r_max 128), several rank blocks per slice in the shrink.
    Case("big_rank", 64, (32, 32, 16), 128, (128, 33, 64), _scattered([0, 1, -1, 1], 20, 3)),
    # More segments than one 16-wide vector of segment starts holds.
    Case(
        "many_segments", 32, (16, 8), 8, tuple(range(1, 9)) * 3, _scattered([-1, *range(23)], 50, 4)
    ),
    Case("one_token", 32, (16, 16, 16), 16, (7, 3), (1,)),
    Case("all_base", 32, (16, 16), 16, (7, 3), (-1, -1, -1)),
]


def _random_case(seed: int) -> Case:
    """Random shapes: 1-3 slices of unequal sizes, odd ranks, some slots absent."""
    gen = torch.Generator().manual_seed(1000 + seed)

    def pick(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    n_slices = 1 + seed % 3
    r_max = (16, 32, 64)[pick(0, 2)]
    num_slots = pick(2, 7)
    ranks = tuple(min(r_max, 2 * pick(0, r_max // 2) + 1) for _ in range(num_slots))
    used = [-1, *range(pick(1, num_slots))]
    return Case(
        f"random{seed}",
        pick(20, 100),
        tuple(pick(5, 70) for _ in range(n_slices)),
        r_max,
        ranks,
        _scattered(used, pick(1, 70), seed),
    )


CASES += [_random_case(seed) for seed in range(4)]
CASE_IDS = [c.name for c in CASES]


@dataclass
class Problem:
    case: Case
    x: torch.Tensor  # [T, in]
    lora_a: torch.Tensor  # [S, n_slices, r_max, in]
    lora_b: torch.Tensor  # [S, total_out, r_max]
    out: torch.Tensor  # [T, total_out]
    meta: LoraKernelMeta
    h_dense: torch.Tensor  # [T, n_slices, r_max] f64, zero outside the valid entries
    out_dense: torch.Tensor  # [T, total_out] f64, expected out after add_lora
    h_valid: torch.Tensor  # [T, n_slices, r_max] bool, entries lora_shrink defines
    base_rows: torch.Tensor  # [T] bool, tokens with slot -1


def make_problem(
    case: Case, dtype: torch.dtype = torch.float32, device: torch.device = DEVICE, seed: int = 0
) -> Problem:
    """Random weights with every entry a kernel must not read set to NaN: A/B rows past a
    slot's rank, slots absent from the batch, and x rows of base-model tokens."""
    gen = torch.Generator().manual_seed(seed)
    num_slots, n_slices = len(case.slot_ranks), len(case.slice_sizes)
    num_tokens, total_out, in_f, r_max = (
        len(case.token_slots),
        case.offsets[-1],
        case.in_features,
        case.r_max,
    )
    x = torch.randn(num_tokens, in_f, generator=gen)
    a = torch.randn(num_slots, n_slices, r_max, in_f, generator=gen) / in_f**0.5
    b = torch.randn(num_slots, total_out, r_max, generator=gen) / r_max**0.5
    out = torch.randn(num_tokens, total_out, generator=gen)
    x, a, b, out = (t.to(dtype) for t in (x, a, b, out))

    present = {s for s in case.token_slots if s >= 0}
    h_dense = torch.zeros(num_tokens, n_slices, r_max, dtype=torch.float64)
    h_valid = torch.zeros(num_tokens, n_slices, r_max, dtype=torch.bool)
    out_dense = out.double().clone()
    for t, s in enumerate(case.token_slots):
        if s < 0:
            continue
        r = case.slot_ranks[s]
        h_t = a[s, :, :r, :].double() @ x[t].double()  # [n_slices, r]
        h_dense[t, :, :r] = h_t
        h_valid[t, :, :r] = True
        for i in range(n_slices):
            lo, hi = case.offsets[i], case.offsets[i + 1]
            out_dense[t, lo:hi] += b[s, lo:hi, :r].double() @ h_t[i]
    for s, r in enumerate(case.slot_ranks):
        a[s, :, r:, :] = NAN
        b[s, :, r:] = NAN
        if s not in present:
            a[s], b[s] = NAN, NAN
    base_rows = torch.tensor([s < 0 for s in case.token_slots], dtype=torch.bool)
    x[base_rows] = NAN

    meta = build_meta(list(case.token_slots), list(case.slot_ranks), device)
    return Problem(
        case, x.to(device), a.to(device), b.to(device), out.to(device), meta,
        h_dense, out_dense, h_valid, base_rows,
    )  # fmt: skip


def assert_h_close(h: torch.Tensor, p: Problem, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(
        h.cpu().double()[p.h_valid], p.h_dense[p.h_valid], atol=atol, rtol=rtol
    )


def assert_out_close(
    out: torch.Tensor, p: Problem, before: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5
) -> None:
    out, before = out.cpu(), before.cpu()
    torch.testing.assert_close(out.double(), p.out_dense, atol=atol, rtol=rtol)
    # Base-model rows must be bit-identical, not merely close.
    assert torch.equal(out[p.base_rows], before[p.base_rows])


def test_build_meta_groups_tokens_by_slot() -> None:
    meta = build_meta([2, -1, 0, 2, 2, -1, 0, 3], [4, 8, 16, 1, 5], "cpu")
    assert meta.sorted_token_ids.tolist() == [2, 6, 0, 3, 4, 7, 1, 5]
    assert meta.seg_starts.tolist() == [0, 2, 5, 6] and meta.seg_slots.tolist() == [0, 2, 3]
    assert meta.seg_starts_host == (0, 2, 5, 6) and meta.seg_ranks_host == (4, 16, 1)
    assert (meta.num_tokens, meta.num_active, meta.max_seg_len, meta.max_rank) == (8, 6, 3, 16)
    assert meta.token_slots.dtype == torch.int32 and meta.slot_ranks.tolist() == [4, 8, 16, 1, 5]
    empty = build_meta([-1, -1], [4], "cpu")
    assert (empty.num_active, empty.num_segments, empty.max_rank) == (0, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        build_meta([0, 5], [4, 4], "cpu")


def test_choose_form_prefers_bgmv_for_decode() -> None:
    assert choose_form(build_meta(list(range(16)), [8] * 16, "cpu")) == "bgmv"
    assert choose_form(build_meta([0, 1] * 8, [8] * 2, "cpu")) == "sgmv"  # 8 per adapter
    assert choose_form(build_meta([0] * 200 + list(range(1, 100)), [8] * 100, "cpu")) == "sgmv"
    assert choose_form(build_meta([-1, -1], [8], "cpu")) == "bgmv"


def test_rejects_bad_slice_offsets() -> None:
    p = make_problem(CASES[0], device=torch.device("cpu"))
    with pytest.raises(ValueError, match="slice_offsets"):
        add_lora(p.x, p.lora_a, p.lora_b, p.out, [0, 64, 128], p.meta, backend="torch")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_dense(case: Case) -> None:
    p = make_problem(case, device=torch.device("cpu"))
    h = shrink_ref(p.x, p.lora_a, p.meta)
    assert_h_close(h, p)
    before = p.out.clone()
    out = p.out.clone()
    expand_ref(h, p.lora_b, out, case.offsets, p.meta)
    assert_out_close(out, p, before)
    fused = p.out.clone()
    add_lora_ref(p.x, p.lora_a, p.lora_b, fused, case.offsets, p.meta)
    torch.testing.assert_close(fused, out)


@needs_triton
@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shrink_kernel(case: Case, form: str) -> None:
    p = make_problem(case)
    h = lora_shrink(p.x, p.lora_a, p.meta, form).sum(0)  # type: ignore[arg-type]
    assert_h_close(h, p)
    h_ref = lora_shrink(p.x, p.lora_a, p.meta, backend="torch")
    assert h_ref.shape[0] == 1
    valid = p.h_valid.to(DEVICE)
    torch.testing.assert_close(h[valid], h_ref[0][valid])


def split_planes(h: torch.Tensor, planes: int, seed: int = 0) -> torch.Tensor:
    """`[planes, *h.shape]` random planes that add up to h (all of h when planes is 1)."""
    gen = torch.Generator().manual_seed(seed)
    rest = torch.randn(planes - 1, *h.shape, generator=gen, dtype=h.dtype)
    return torch.cat([(h - rest.sum(0))[None], rest])


@needs_triton
@pytest.mark.parametrize("planes", [1, 3])
@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_expand_kernel(case: Case, form: str, planes: int) -> None:
    p = make_problem(case)
    # Feed the exact h, as split planes, with NaN wherever lora_shrink leaves h unspecified.
    h = torch.where(p.h_valid, split_planes(p.h_dense, planes), NAN).float().to(DEVICE)
    before = p.out.clone()
    out = p.out.clone()
    lora_expand(h, p.lora_b, out, case.offsets, p.meta, form)  # type: ignore[arg-type]
    assert_out_close(out, p, before)
    out_ref = p.out.clone()
    lora_expand(h, p.lora_b, out_ref, case.offsets, p.meta, backend="torch")
    torch.testing.assert_close(out, out_ref)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
def test_expand_takes_one_plane_in_out_dtype(form: Form, backend: Backend) -> None:
    """A shrink folded into the base GEMM hands the expand h in bf16, one plane, as
    columns of the GEMM's output (a row stride wider than h): the sums of that h in
    float32, rounded once."""
    case = CASES[-1]
    p = make_problem(case, torch.bfloat16)
    h = torch.where(p.h_valid, p.h_dense, NAN).to(torch.bfloat16).to(DEVICE)  # [T, n, r]
    gemm = torch.cat([p.out.new_zeros(h.shape[0], 7), h.flatten(1)], dim=1)
    folded = gemm[:, 7:].unflatten(1, h.shape[1:])[None]  # [1, T, n, r], row stride wider
    out, expected = p.out.clone(), p.out.clone()
    lora_expand(folded, p.lora_b, out, case.offsets, p.meta, form, backend=backend)
    lora_expand(h.float()[None], p.lora_b, expected, case.offsets, p.meta, form, backend=backend)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="one plane"):
        lora_expand(folded.expand(2, -1, -1, -1), p.lora_b, out, case.offsets, p.meta, form)


@needs_triton
@pytest.mark.parametrize("form", [None, "sgmv", "bgmv"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_add_lora_end_to_end(case: Case, form: str | None) -> None:
    p = make_problem(case, seed=7)
    # A reused scratch buffer full of stale values must not leak into the result.
    scratch = new_scratch(len(case.token_slots), len(case.slice_sizes), case.r_max, DEVICE)
    scratch.fill_(NAN)
    before = p.out.clone()
    out = p.out.clone()
    add_lora(p.x, p.lora_a, p.lora_b, out, case.offsets, p.meta, form=form, h=scratch)  # type: ignore[arg-type]
    assert_out_close(out, p, before)
    out_ref = p.out.clone()
    add_lora(p.x, p.lora_a, p.lora_b, out_ref, case.offsets, p.meta, backend="torch")
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)


# Reductions long enough to split: with these tiles, 80 splits 3 ways (rounding leaves a
# 4th split idle) or 5 ways, 250 into 16 planes (the most there are; the last is short).
SPLIT_CASES = [
    (Case("split_qkv", 80, (24, 8, 16), 16, (3, 16, 0, 9), (0, 1, -1, 3, 0, 2, 1)), 4, 3),
    (Case("split_5", 80, (24, 8, 16), 16, (3, 16, 0, 9), (0, 1, -1, 3, 0, 2, 1)), 5, 5),
    (Case("split_most", 250, (20,), 8, (8, 5), (1, -1, 0, 0, 1)), MAX_SPLIT_K, MAX_SPLIT_K),
]


@needs_triton
@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
@pytest.mark.parametrize(
    ("case", "split_k", "planes"), SPLIT_CASES, ids=[c.name for c, _, _ in SPLIT_CASES]
)
def test_split_k_writes_planes_without_zero_fill(
    case: Case, split_k: int, planes: int, form: str
) -> None:
    """A split-K shrink stores each split into its own plane of a scratch full of NaN
    (no zero-fill needed), and the expand adds the planes up."""
    from engine.kernels import bgmv, sgmv
    from engine.kernels.triton_common import LaunchConfig

    p = make_problem(case, seed=3)
    block_m = 1 if form == "bgmv" else 16
    config = LaunchConfig(block_m, 16, 16, split_k)
    shrink, expand = (
        (bgmv.bgmv_shrink, bgmv.bgmv_expand)
        if form == "bgmv"
        else (sgmv.sgmv_shrink, sgmv.sgmv_expand)
    )
    scratch = new_scratch(len(case.token_slots), len(case.slice_sizes), case.r_max, DEVICE)
    scratch.fill_(NAN)
    h = shrink(p.x, p.lora_a, scratch, p.meta, config)
    assert h.shape[0] == planes and h.data_ptr() == scratch.data_ptr()
    assert_h_close(h.sum(0), p)
    before = p.out.clone()
    out = p.out.clone()
    expand(h, p.lora_b, out, case.offsets, p.meta)
    assert_out_close(out, p, before)
    out_ref = p.out.clone()
    add_lora(p.x, p.lora_a, p.lora_b, out_ref, case.offsets, p.meta, backend="torch")
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="planes"):
        shrink(p.x, p.lora_a, scratch[: planes - 1], p.meta, config)


@needs_triton
@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
def test_add_lora_split_k_from_heuristics(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a device with many SMs the launch heuristics split the shrink (capped at
    `MAX_SPLIT_K`), and add_lora hands the expand the planes the shrink wrote."""
    from engine.kernels import triton_common

    monkeypatch.setattr(triton_common, "sm_count", lambda device: 10_000)
    assert triton_common.split_k_for(1, 1 << 20, 16, DEVICE, 6, 1) == MAX_SPLIT_K
    with pytest.raises(ValueError, match="split_k"):
        triton_common.LaunchConfig(1, 16, 16, MAX_SPLIT_K + 1)
    # 8192 inputs: 32 splits of the fewest K-blocks allowed, so the cap decides.
    case = Case("split_heuristic", 8192, (24, 8), 8, (8, 3, 5), (2, -1, 0, 1, 0))
    p = make_problem(case, seed=5)
    h = lora_shrink(p.x, p.lora_a, p.meta, form)  # type: ignore[arg-type]
    assert h.shape[0] == MAX_SPLIT_K
    assert_h_close(h.sum(0), p, atol=1e-4, rtol=1e-4)
    scratch = new_scratch(len(case.token_slots), len(case.slice_sizes), case.r_max, DEVICE)
    scratch.fill_(NAN)
    before = p.out.clone()
    out = p.out.clone()
    add_lora(p.x, p.lora_a, p.lora_b, out, case.offsets, p.meta, form=form, h=scratch)  # type: ignore[arg-type]
    assert_out_close(out, p, before, atol=1e-4, rtol=1e-4)


def _prefill_slots() -> tuple[int, ...]:
    # Prompt chunks of 8 adapters and of base-model requests; adapter 0 has two requests,
    # so its tokens are not contiguous in the batch.
    chunks = [(0, 300), (1, 256), (2, 250), (-1, 100), (3, 200), (4, 180), (5, 150)]
    chunks += [(6, 112), (7, 200), (-1, 100), (0, 200)]
    slots = [s for s, n in chunks for _ in range(n)]
    assert len(slots) == 2048
    return tuple(slots)


def _decode_slots() -> tuple[int, ...]:
    order = torch.randperm(32, generator=torch.Generator().manual_seed(5)).tolist()
    return tuple(-1 if s >= 28 else s for s in order)  # 28 adapters, 4 base-model tokens


# Llama-3.1-8B groups: q/k/v (4096 -> 4096 + 1024 + 1024) and down (14336 -> 4096).
GPU_GROUPS = {"qkv": (4096, (4096, 1024, 1024)), "down": (14336, (4096,))}
GPU_BATCHES = {"decode": (32, _decode_slots()), "prefill": (8, _prefill_slots())}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", list(GPU_BATCHES))
@pytest.mark.parametrize("group", list(GPU_GROUPS))
def test_kernels_bf16_llama_shapes(group: str, batch: str) -> None:
    if _SKIP is not None:
        pytest.skip(_SKIP)
    from triton.runtime.interpreter import InterpretedFunction

    from engine.kernels import sgmv

    if isinstance(sgmv._sgmv_shrink_kernel, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET=1 is set: run the gpu tests with compiled kernels")
    in_features, slices = GPU_GROUPS[group]
    num_slots, token_slots = GPU_BATCHES[batch]
    # Rank 16 adapters in a pool padded to r_max 32, plus one rank-8 adapter.
    ranks = (8,) + (16,) * (num_slots - 1)
    case = Case(f"{group}-{batch}", in_features, slices, 32, ranks, token_slots)
    p = make_problem(case, dtype=torch.bfloat16, device=torch.device("cuda"))
    before = p.out.clone()

    for form in ("sgmv", "bgmv"):
        h = lora_shrink(p.x, p.lora_a, p.meta, form)
        assert_h_close(h.sum(0), p, atol=1e-3, rtol=1e-3)
        out = p.out.clone()
        lora_expand(h, p.lora_b, out, case.offsets, p.meta, form)
        assert_out_close(out, p, before, atol=2e-2, rtol=2e-2)
    for backend in ("triton", "torch"):
        out = p.out.clone()
        add_lora(p.x, p.lora_a, p.lora_b, out, case.offsets, p.meta, backend=backend)
        assert_out_close(out, p, before, atol=2e-2, rtol=2e-2)
