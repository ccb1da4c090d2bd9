"""Multi-LoRA kernels (Triton SGMV/BGMV with plain-torch references) for projection groups."""

from engine.kernels.lora_ops import (
    SGMV_LONG_SEGMENT,
    SGMV_MIN_AVG_SEGMENT,
    add_lora,
    choose_form,
    default_backend,
    lora_expand,
    lora_shrink,
    shares_adapters,
    triton_available,
)
from engine.kernels.meta import MAX_SLICES, NO_SLOT, LoraKernelMeta, build_meta

__all__ = [
    "MAX_SLICES",
    "NO_SLOT",
    "SGMV_LONG_SEGMENT",
    "SGMV_MIN_AVG_SEGMENT",
    "LoraKernelMeta",
    "add_lora",
    "build_meta",
    "choose_form",
    "default_backend",
    "lora_expand",
    "lora_shrink",
    "shares_adapters",
    "triton_available",
]
