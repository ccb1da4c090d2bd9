"""The seam between the base model and LoRA: it runs each fused base projection.

The model knows nothing about adapters; whatever the runner passes as `lora` runs the
projection and decides, per token, which adapter slot (if any) adds its delta (and may
overlap its own work with the base GEMM). `None` costs nothing.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

# The four fused projections of a decoder layer, in forward order, and the checkpoint
# projections each one stacks along its output dimension (in this row order).
PROJECTION_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class LoraApplier(Protocol):
    """Runs the base projections of one forward pass and adds per-token LoRA deltas."""

    def project(
        self, layer: int, group: str, x: Tensor, weight: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        """`F.linear(x, weight, bias)` with each tagged token's LoRA delta added.

        `group` is one of PROJECTION_GROUPS: "qkv" (out [T, q+k+v], rows q then k then v),
        "o" (out [T, hidden]), "gate_up" (out [T, 2*intermediate], gate then up),
        "down" (out [T, hidden]). `x` is that projection's input [T, in], `weight` the
        fused base weight [out, in]. Rows of tokens without an adapter are the base
        projection's alone.
        """
        ...
