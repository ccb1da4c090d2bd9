"""The one attention signature every backend implements, and the choice among them.

A backend `attend(q, k, v, kv_layer, meta, scale) -> out` first stores the new k/v at
`meta.slot_mapping` in `kv_layer`, then attends every new token causally to its own
sequence's cached context (see `AttentionMetadata`).

Where faster backends plug in: `select_backend` is the only place that chooses. A
flash-attn backend (varlen prefill via `meta.query_start_loc_tensor`, paged decode via
`meta.block_tables` / `meta.context_lens_tensor`) and a Triton paged-decode kernel go
in sibling modules with the same signature, selected here when importable on CUDA.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import attend_torch


class AttentionBackend(Protocol):
    def __call__(
        self,
        q: Tensor,  # [T, H, D]
        k: Tensor,  # [T, KVH, D]
        v: Tensor,  # [T, KVH, D]
        kv_layer: Tensor,  # [2, num_blocks, block_size, KVH, D]
        meta: AttentionMetadata,
        scale: float,
    ) -> Tensor:  # [T, H, D]
        ...


def select_backend(device: torch.device | str) -> AttentionBackend:
    """The best backend available for `device`; today the torch reference everywhere."""
    del device  # every device uses the reference until the CUDA backends land
    return attend_torch
