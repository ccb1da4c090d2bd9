"""Pieces shared by the SGMV and BGMV Triton kernels: slice bounds and launch sizing.

Only imported when Triton is; `engine.kernels.lora_ops` imports the kernel modules lazily
so that a CPU engine without Triton never touches this file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.lora_ops import MAX_SPLIT_K
from engine.kernels.meta import MAX_SLICES, LoraKernelMeta


@triton.jit
def slice_bounds(i: tl.constexpr, o0, o1, o2, o3, o4):
    """`(lo, hi)` column range of output slice i; `i` is a compile-time constant."""
    if i == 0:
        lo = o0
        hi = o1
    elif i == 1:
        lo = o1
        hi = o2
    elif i == 2:
        lo = o2
        hi = o3
    else:
        lo = o3
        hi = o4
    return lo, hi


def padded_offsets(slice_offsets: Sequence[int]) -> list[int]:
    """The 5 scalar offsets the kernels take: the real ones, then `total_out` repeated.

    Scalars rather than a device tensor: no host→device copy per launch, and a group's
    offsets never change, so they cost no recompilation either.
    """
    offsets = [int(o) for o in slice_offsets]
    return offsets + [offsets[-1]] * (MAX_SLICES + 1 - len(offsets))


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise go through TF32 on the GPU; 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def cdiv(a: int, b: int) -> int:
    # Plain Python: `triton.cdiv` is a constexpr function whose wrapper costs
    # microseconds per host call, and launches are host-bound at decode sizes.
    return -(-a // b)


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of one kernel launch.

    block_m: tokens per program (SGMV; BGMV programs serve one token). block_n: output
    rows per program ((slice, rank) rows for a shrink, columns for an expand). block_k:
    reduction block (over `in` for a shrink, over the rank for an expand). split_k:
    programs sharing one shrink reduction (at most `MAX_SPLIT_K`); each writes its
    partial sums with plain stores into its own plane of h, and the expand adds the
    planes up, so h needs no zero-fill.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.split_k <= MAX_SPLIT_K:
            raise ValueError(f"split_k must be in [1, {MAX_SPLIT_K}], got {self.split_k}")

    def k_per_split(self, in_features: int) -> int:
        """Width of `in` one split covers: a whole number of K blocks."""
        return cdiv(cdiv(in_features, self.split_k), self.block_k) * self.block_k

    def splits(self, in_features: int) -> int:
        """Splits that actually get work (rounding k_per_split up can leave some idle)."""
        return cdiv(in_features, self.k_per_split(in_features))


def cached_config(
    meta: LoraKernelMeta, key: tuple[Hashable, ...], make: Callable[[], LaunchConfig]
) -> LaunchConfig:
    """`make()` once per step and key: every layer of a step launches with the same shapes."""
    config = meta.launch_cache.get(key)
    if config is None:
        config = meta.launch_cache[key] = make()
    return config


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs
    programs one after another, so there fewer, larger programs are faster)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_k_for(
    programs: int,
    in_features: int,
    block_k: int,
    device: torch.device,
    waves: int,
    min_k_blocks: int,
) -> int:
    """Split the reduction over `in` when the other grid axes leave SMs idle.

    Aims at `waves` programs per SM and keeps at least `min_k_blocks` K-blocks per split.
    Never more than `MAX_SPLIT_K` splits: the h scratch has that many planes.
    """
    # Round down: a launch a little under the target beat one a little over in the sweep.
    want = waves * sm_count(device) // max(programs, 1)
    most = max(1, cdiv(in_features, min_k_blocks * block_k))
    return max(1, min(want, most, MAX_SPLIT_K))
