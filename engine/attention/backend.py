"""The one attention signature every backend implements, and the choice among them.

A backend `attend(q, k, v, kv_layer, meta, scale) -> out` first stores the new k/v at
`meta.slot_mapping` in `kv_layer` (unless `kv_written`: the model's fused RoPE kernel
already did), then attends every new token causally to its own
sequence's cached context (see `AttentionMetadata`).

`select_backend` is the only place that chooses: on CUDA with Triton installed, the
Triton varlen flash-attention kernel for steps with prefill chunks and the Triton
paged-decode kernel for decode-only steps (`triton_backend.attend_triton`); everywhere
else (the CPU, or CUDA without Triton) the torch reference.
"""

from __future__ import annotations

import sys
from typing import Protocol

import torch
from torch import Tensor

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import attend_torch
from engine.kernels import triton_available


class AttentionBackend(Protocol):
    def __call__(
        self,
        q: Tensor,  # [T, H, D]
        k: Tensor,  # [T, KVH, D]
        v: Tensor,  # [T, KVH, D]
        kv_layer: Tensor,  # [2, num_blocks, block_size, KVH, D]
        meta: AttentionMetadata,
        scale: float,
        kv_written: bool = False,  # the caller already stored k/v at meta.slot_mapping
    ) -> Tensor:  # [T, H, D]
        ...


def select_backend(device: torch.device | str) -> AttentionBackend:
    """The best backend available for `device`: the Triton kernels on CUDA, else the reference."""
    if torch.device(device).type == "cuda" and triton_available():
        # Imported here: a CPU engine never compiles (or even imports) Triton kernels.
        from engine.attention.triton_backend import attend_triton

        return attend_triton
    return attend_torch


def supports_decode_graphs(backend: AttentionBackend) -> bool:
    """Whether `backend` can run in a captured CUDA graph on
    `AttentionMetadata.for_decode_graph` (it must read decode lengths from the device)."""
    # If `backend` is the Triton one, its module is already imported: no import here.
    module = sys.modules.get("engine.attention.triton_backend")
    return module is not None and backend is module.attend_triton
