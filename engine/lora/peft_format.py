"""Load a PEFT LoRA folder into host tensors ready for the slot pool.

Contract of `load_adapter`: the folder passes `validate_adapter_header` (same code,
same header), its weights are finite, and its sha256 matches `expected_sha256` when
given. Each targeted (layer, projection) yields `A [r, in]` and `B_scaled [out, r]`,
float32 on the CPU, with PEFT's scaling (alpha/r or alpha/sqrt(r), per module)
folded into B so that `delta = x @ A.T @ B_scaled.T` is exactly PEFT's LoRA output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from engine.lora.adapter_config import read_adapter_config
from engine.lora.adapter_header import (
    AdapterSummary,
    check_sha256,
    summarize,
    validate_adapter_header,
    weights_file,
)
from engine.lora.errors import AdapterFormatError
from engine.lora.safetensors_header import read_header_from_bytes
from engine.model.config import ModelConfig

__all__ = ["LoraWeights", "load_adapter", "validate_adapter_header"]


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's weights on the host; immutable once built.

    `modules[(layer, projection)] = (A, B_scaled)`: A `[r, in]` and B_scaled `[out, r]`
    float32 CPU tensors (pinned when the registry pins them), scaling folded into B.
    Projections and layers absent from `modules` are not targeted (zero delta).
    """

    summary: AdapterSummary
    modules: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return self.summary.rank

    @property
    def alpha(self) -> float:
        return self.summary.alpha

    @property
    def target_modules(self) -> tuple[str, ...]:
        return self.summary.target_modules

    @property
    def size_bytes(self) -> int:
        return self.summary.size_bytes

    @property
    def sha256(self) -> str:
        return self.summary.sha256

    def pinned(self) -> LoraWeights:
        """A copy whose tensors live in page-locked memory (needs a CUDA build), so the
        slot pool can copy them to the device asynchronously."""
        modules = {key: (a.pin_memory(), b.pin_memory()) for key, (a, b) in self.modules.items()}
        return LoraWeights(summary=self.summary, modules=modules)


def load_adapter(
    folder: Path, model_config: ModelConfig, max_rank: int, *, expected_sha256: str = ""
) -> LoraWeights:
    """Read, validate and scale the adapter in `folder`; AdapterFormatError on any problem."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    path = weights_file(folder)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AdapterFormatError("corrupt_weights", f"cannot read {path}: {exc}") from exc
    sha256 = hashlib.sha256(data).hexdigest()
    check_sha256(path, sha256, expected_sha256)
    header = read_header_from_bytes(path, data)
    summary = summarize(config, header, model_config, max_rank, len(data), sha256)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(
            "corrupt_weights", f"{path} could not be decoded as safetensors: {exc}"
        ) from exc
    del data

    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in summary.modules:
        a = _finite_float32(path, spec.a_name, tensors[spec.a_name])  # [r, in]
        b = _finite_float32(path, spec.b_name, tensors[spec.b_name])  # [out, r]
        # Scaling in float32 before any cast to the serving dtype, as PEFT does it.
        modules[(spec.layer, spec.projection)] = (a.contiguous(), (b * spec.scaling).contiguous())
    return LoraWeights(summary=summary, modules=modules)


def _finite_float32(path: Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise AdapterFormatError(
            "non_finite",
            f"tensor {name} in {path} contains {bad} values; the training run diverged — "
            "use an earlier checkpoint or retrain",
        )
    return tensor
