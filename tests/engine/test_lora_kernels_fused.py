"""Fused decode LoRA kernel ("bgmv_fused"): Triton vs the torch reference vs float64.

Like `test_lora_kernels.py` (whose problems and checks it reuses), the kernel runs under
the Triton interpreter at small float32 shapes when there is no CUDA, and the `gpu`
test runs it compiled in bf16 at Llama-3.1-8B decode shapes. Every entry the kernel
must not read is NaN: x rows of slot -1 tokens, A/B rows past a slot's rank, slots
absent from the batch; base-model rows of out must come back bit-identical.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.kernels import LoraKernelMeta, add_lora, build_meta, lora_expand, lora_shrink  # noqa: E402
from tests.engine.test_lora_kernels import (  # noqa: E402
    _SKIP,
    CASES,
    DEVICE,
    Case,
    Problem,
    _scattered,
    assert_out_close,
    make_problem,
    needs_triton,
)

FUSED_CASES = [
    *CASES,
    # 37 tokens, three unequal slices, odd ranks, a rank-0 slot that tokens point at.
    Case("t37", 72, (50, 13, 29), 32, (31, 1, 17, 0, 9), _scattered([-1, 0, 1, 2, 3, 4], 37, 11)),
    Case("t1_two_slices", 48, (24, 40), 16, (5, 11), (1,)),
    # An empty middle slice has no chunks: the slice lookup must skip it.
    Case("empty_slice", 32, (20, 0, 12), 16, (7, 16, 3), (0, -1, 1, 0, 1)),
]
FUSED_IDS = [c.name for c in FUSED_CASES]


def small_chunks(case: Case) -> object:
    """Several chunks per slice, a chunk that is not a whole number of expand steps,
    and several K steps with a ragged tail: every boundary of the kernel is exercised."""
    from engine.kernels.bgmv_fused import FusedConfig
    from engine.kernels.triton_common import next_pow2

    return FusedConfig(next_pow2(case.r_max), block_k=32, block_n=16, chunk_rows=24)


def bound_meta(meta: LoraKernelMeta, r_max: int) -> LoraKernelMeta:
    """The meta a decode CUDA graph launches with (`engine.cuda_graphs`): the same device
    tensors, host fields replaced by bounds (every token active, the pool's r_max)."""
    return dataclasses.replace(
        meta,
        num_active=meta.num_tokens,
        max_rank=r_max,
        max_seg_len=1,
        seg_starts_host=(0,),
        seg_slots_host=(),
        seg_ranks_host=(),
        launch_cache={},
    )


def run_fused(p: Problem, config: object = None, meta: LoraKernelMeta | None = None):
    from engine.kernels.bgmv_fused import bgmv_fused_add

    out = p.out.clone()
    bgmv_fused_add(p.x, p.lora_a, p.lora_b, out, p.case.offsets, meta or p.meta, config)  # type: ignore[arg-type]
    return out


def reference_out(p: Problem) -> torch.Tensor:
    out = p.out.clone()
    add_lora(p.x, p.lora_a, p.lora_b, out, p.case.offsets, p.meta, backend="torch")
    return out


@needs_triton
def test_fused_config_sizes_llama_decode() -> None:
    from engine.kernels.bgmv_fused import MIN_CHUNK_ROWS, fused_config

    groups = {
        "qkv": (4096, (4096, 1024, 1024)),
        "o": (4096, (4096,)),
        "gate_up": (4096, (14336, 14336)),
        "down": (14336, (4096,)),
    }
    for name, (in_features, sizes) in groups.items():
        cfg = fused_config(32, sizes, in_features, 16, 2, 132)
        assert cfg == fused_config(32, sizes, in_features, 16, 2, 132)  # pure function
        programs = 32 * sum(cfg.chunk_counts(sizes))
        assert 32 <= programs <= 2 * 132, (name, cfg, programs)
        if in_features == 4096:  # A is cheap to re-read: at least one program per SM
            assert programs >= 128, (name, cfg, programs)
        assert cfg.chunk_rows % cfg.block_n == 0 and cfg.chunk_rows >= MIN_CHUNK_ROWS
        assert cfg.block_r == 16 and cfg.block_k * cfg.block_r * 2 <= 32768
    big = fused_config(32, (4096,), 4096, 100, 4, 132)
    assert big.block_r == 128 and big.block_k * big.block_r * 4 <= 32768
    with pytest.raises(ValueError):
        fused_config(0, (16,), 16, 16, 4, 1)


@needs_triton
@pytest.mark.parametrize("chunks", ["auto", "small"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=FUSED_IDS)
def test_fused_matches_reference_and_dense(case: Case, chunks: str) -> None:
    p = make_problem(case, seed=3)
    out = run_fused(p, small_chunks(case) if chunks == "small" else None)
    assert_out_close(out, p, p.out)  # float64 dense; slot -1 rows bit-identical
    torch.testing.assert_close(out, reference_out(p), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("case", [FUSED_CASES[0], FUSED_CASES[-3]], ids=["qkv_mixed", "t37"])
def test_fused_graph_bounds_and_device_ranks(case: Case) -> None:
    """Launch sizes from bounds (as in a CUDA graph) give the same sums, and ranks and
    slots are read from device memory at launch, after the config was memoised."""
    p = make_problem(case, seed=5)
    meta = bound_meta(p.meta, case.r_max)
    assert_out_close(run_fused(p, None, meta), p, p.out)
    # A slot reload between replays: slot 0 now holds a rank-1 adapter (rows past it NaN).
    p.lora_a[0, :, 1:] = float("nan")
    p.lora_b[0, :, 1:] = float("nan")
    meta.slot_ranks[0] = 1
    out = run_fused(p, None, meta)
    ranks = list(case.slot_ranks)
    ranks[0] = 1
    p2 = dataclasses.replace(p, meta=build_meta(list(case.token_slots), ranks, DEVICE))
    torch.testing.assert_close(out, reference_out(p2), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[p.base_rows.to(DEVICE)], p.out[p.base_rows.to(DEVICE)])


@needs_triton
def test_add_lora_fused_form() -> None:
    case = FUSED_CASES[0]
    p = make_problem(case, seed=9)
    out = p.out.clone()
    stale = torch.full((len(case.token_slots), 3, case.r_max), float("nan"), device=DEVICE)
    add_lora(p.x, p.lora_a, p.lora_b, out, case.offsets, p.meta, form="bgmv_fused", h=stale)
    assert_out_close(out, p, p.out)
    # The torch backend computes the same sums whatever the form.
    ref = p.out.clone()
    add_lora(p.x, p.lora_a, p.lora_b, ref, case.offsets, p.meta, backend="torch", form="bgmv_fused")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="add_lora"):
        lora_shrink(p.x, p.lora_a, p.meta, "bgmv_fused")
    h = torch.zeros(len(case.token_slots), 3, case.r_max, device=DEVICE)
    with pytest.raises(ValueError, match="add_lora"):
        lora_expand(h, p.lora_b, out, case.offsets, p.meta, "bgmv_fused")
    with pytest.raises(ValueError, match="one dtype"):
        add_lora(p.x, p.lora_a, p.lora_b, out.double(), case.offsets, p.meta, form="bgmv_fused")


def _decode_slots() -> tuple[int, ...]:
    order = torch.randperm(32, generator=torch.Generator().manual_seed(5)).tolist()
    return tuple(-1 if s >= 28 else s for s in order)  # 28 adapters, 4 base-model tokens


GPU_GROUPS = {
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group", list(GPU_GROUPS))
def test_fused_bf16_llama_decode(group: str) -> None:
    if _SKIP is not None:
        pytest.skip(_SKIP)
    from triton.runtime.interpreter import InterpretedFunction

    from engine.kernels import bgmv_fused

    if isinstance(bgmv_fused._bgmv_fused_kernel, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET=1 is set: run the gpu tests with compiled kernels")
    in_features, slices = GPU_GROUPS[group]
    ranks = (8,) + (16,) * 27  # rank-16 adapters and one rank-8, pool padded to 32
    case = Case(f"{group}-decode", in_features, slices, 32, ranks, _decode_slots())
    p = make_problem(case, dtype=torch.bfloat16, device=torch.device("cuda"))
    ref = reference_out(p)
    for meta in (p.meta, bound_meta(p.meta, case.r_max)):
        out = run_fused(p, None, meta)
        assert_out_close(out, p, p.out, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
