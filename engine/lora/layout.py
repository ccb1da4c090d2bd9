"""How one adapter's projections stack into the four fused projection groups.

Shared by the host-side packed image (`peft_format.LoraWeights`) and the device slots
(`slot_pool.LoraSlotPool`), so both agree on the layout by construction: per group,
A is `[L, n_slices, r, in]` (slice i = projection i's A) and B is `[L, total_out, r]`
(projection i's B at rows `slice_offsets[i]:slice_offsets[i + 1]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.config import ModelConfig
from engine.model.lora_hook import PROJECTION_GROUPS

GROUPS = ("qkv", "o", "gate_up", "down")
# projection -> (group, slice index within the group)
SLICE_OF = {p: (g, i) for g, projs in PROJECTION_GROUPS.items() for i, p in enumerate(projs)}


@dataclass(frozen=True)
class GroupLayout:
    projections: tuple[str, ...]
    in_features: int
    slice_offsets: tuple[int, ...]  # len(projections) + 1 row offsets into B

    @property
    def num_slices(self) -> int:
        return len(self.projections)

    @property
    def total_out(self) -> int:
        return self.slice_offsets[-1]

    def a_shape(self, num_layers: int, rank: int) -> tuple[int, int, int, int]:
        return (num_layers, self.num_slices, rank, self.in_features)

    def b_shape(self, num_layers: int, rank: int) -> tuple[int, int, int]:
        return (num_layers, self.total_out, rank)


def group_layouts(model_config: ModelConfig) -> dict[str, GroupLayout]:
    """The layout of every group in GROUPS order."""
    layouts = {}
    for group in GROUPS:
        projections = PROJECTION_GROUPS[group]
        outs = [model_config.projection_shape(p)[0] for p in projections]
        layouts[group] = GroupLayout(
            projections=projections,
            in_features=model_config.projection_shape(projections[0])[1],
            slice_offsets=tuple(sum(outs[:i]) for i in range(len(outs) + 1)),
        )
    return layouts


def slot_bytes(model_config: ModelConfig, rank: int, dtype: torch.dtype) -> int:
    """Device bytes of one adapter slot at `rank` (A and B of every group and layer)."""
    elements = 0
    for layout in group_layouts(model_config).values():
        per_layer = layout.num_slices * rank * layout.in_features + layout.total_out * rank
        elements += model_config.num_layers * per_layer
    return elements * torch.empty((), dtype=dtype).element_size()
