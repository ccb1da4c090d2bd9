"""The seam between the base model and LoRA: one call after each fused base projection.

The model knows nothing about adapters; whatever the runner passes as `lora` decides,
per token, which adapter slot (if any) adds its delta. `None` costs nothing.
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
    """Adds per-token LoRA deltas to the base projections of one forward pass.

    `folded` False: the model calls `apply` after each base projection. True: one
    adapter's A rows sit in the spare rows after each projection's weight (the model's
    `fold_rank`), so the base GEMM also yields each token's rank vector h, and the
    model calls `expand` with it instead.
    """

    folded: bool

    def apply(self, layer: int, group: str, x: Tensor, out: Tensor) -> None:
        """Add each tagged token's LoRA delta to `out` in place.

        `group` is one of PROJECTION_GROUPS: "qkv" (out [T, q+k+v], rows q then k then v),
        "o" (out [T, hidden]), "gate_up" (out [T, 2*intermediate], gate then up),
        "down" (out [T, hidden]). `x` is that projection's input [T, in]; `out` already
        holds the base output including any bias. Tokens without an adapter are untouched.
        """
        ...

    def expand(self, layer: int, group: str, h: Tensor, out: Tensor) -> None:
        """`apply` for a folded shrink: `h` `[T, n_slices * fold_rank]` is x's product
        with the spare rows, slice after slice, in out's dtype."""
        ...
