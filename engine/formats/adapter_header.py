"""Validate a PEFT LoRA folder against a base model from its config and tensor header.

Everything that can be known without reading tensor data is checked here: the config
options, which modules the tensors target, ranks, and every A/B shape against the base
weight. The full loader (`engine.lora.peft_format.load_adapter`) runs this same code on
the same header before it reads any tensor, so the two can never disagree; it adds only
the checks that need the data (finite values, checksum). Torch-free on purpose: the
control plane calls `validate_adapter_header` at registration time.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from engine.formats.adapter_config import LoraAdapterConfig, PinnedConfig, read_pinned_config
from engine.formats.adapter_folder import unreadable_weights, weights_file
from engine.formats.chunked_digest import file_digests
from engine.formats.errors import (
    AdapterChanged,
    AdapterFormatError,
    AdapterIncompatible,
    AdapterMalformed,
)
from engine.formats.safetensors_header import (
    LORA_LIMITS,
    SafetensorsHeaderError,
    TensorInfo,
    read_header_from_bytes,
    read_header_from_file,
)
from engine.model.config import PROJECTIONS, ModelConfig

# What to do about a weights file that is not valid safetensors, by the header's reason.
_HEADER_ADVICE = {
    "corrupt_weights": "; re-save the adapter with save_pretrained(..., safe_serialization=True)",
    "truncated_weights": "",
    "unsupported_dtype": "; LoRA weights must be F32, F16 or BF16",
}
_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# PEFT writes `base_model.model.<module>.lora_A.weight`; transformers' own PEFT
# integration writes `<module>.lora_A.weight`. The module name is what PEFT matches.
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>(?:model\.)?layers\.(?P<layer>\d+)\."
    r"(?P<parent>[A-Za-z_]+)\.(?P<proj>[A-Za-z_0-9]+))\.lora_(?P<ab>[AB])\.weight$"
)


@dataclass(frozen=True)
class LoraModuleSpec:
    """One targeted projection of one layer, as found in the tensor header."""

    layer: int
    projection: str  # one of PROJECTIONS
    rank: int
    scaling: float  # already resolved from alpha/alpha_pattern, r/rank_pattern, rsLoRA
    a_name: str  # tensor name of lora_A, [rank, in]
    b_name: str  # tensor name of lora_B, [out, rank]


@dataclass(frozen=True)
class AdapterSummary:
    """What registration and the admin API need to know about a valid adapter."""

    rank: int  # largest rank over the modules (the slot rank it needs)
    alpha: float  # lora_alpha of adapter_config.json
    use_rslora: bool
    target_modules: tuple[str, ...]  # projections present, in PROJECTIONS order
    modules: tuple[LoraModuleSpec, ...]  # ordered by (layer, projection)
    size_bytes: int  # of adapter_model.safetensors
    sha256: str  # hex digest of adapter_model.safetensors; "" when not computed
    base_model_name_or_path: str
    config_sha256: str  # hex digest of the adapter_config.json bytes parsed
    # engine.formats.chunked_digest of the same bytes as sha256; "" when not computed
    chunked_sha256: str = ""


def validate_adapter_header(
    folder: Path,
    model_config: ModelConfig,
    max_rank: int,
    *,
    expected_sha256: str = "",
    compute_sha256: bool = False,
) -> AdapterSummary:
    """Check `folder` against the base model without reading tensor data.

    Raises AdapterFormatError (a subclass, with `.reason`) on the first problem. The
    checksums (sha256 and chunked sha256, from one read of the whole file) are computed
    only when `expected_sha256` is given, then compared, or when `compute_sha256` is set.
    """
    pinned = read_pinned_config(folder)
    path = weights_file(folder)
    try:
        tensors, size_bytes = read_header_from_file(path, LORA_LIMITS)
    except OSError as exc:
        raise unreadable_weights(path, exc) from exc
    except SafetensorsHeaderError as exc:
        raise weights_header_error(exc) from exc
    sha256 = chunked = ""
    if expected_sha256 or compute_sha256:
        sha256, chunked = file_digests(path)
        check_sha256(path, sha256, expected_sha256)
    summary = summarize(pinned, tensors, model_config, max_rank, size_bytes, sha256)
    return dataclasses.replace(summary, chunked_sha256=chunked)


def header_from_bytes(path: Path, data: bytes) -> dict[str, TensorInfo]:
    """The tensor header of a weights file already read into `data`; AdapterMalformed
    when it is not a valid LoRA safetensors file."""
    try:
        return read_header_from_bytes(path, data, LORA_LIMITS)
    except SafetensorsHeaderError as exc:
        raise weights_header_error(exc) from exc


def weights_header_error(exc: SafetensorsHeaderError) -> AdapterMalformed:
    return AdapterMalformed(exc.reason, f"{exc}{_HEADER_ADVICE[exc.reason]}")


def check_sha256(path: Path, actual: str, expected: str) -> None:
    if expected and actual.lower() != expected.lower():
        raise AdapterChanged(
            "sha256_mismatch",
            f"{path} has sha256 {actual} but {expected} was expected; the file changed "
            "since it was registered: register the new file as a new version",
        )


def summarize(
    pinned: PinnedConfig,
    tensors: dict[str, TensorInfo],
    model_config: ModelConfig,
    max_rank: int,
    size_bytes: int,
    sha256: str,
) -> AdapterSummary:
    """Match tensors to modules and check every shape and rank; the shared core."""
    config = pinned.config
    pairs: dict[tuple[int, str], dict[str, TensorInfo]] = {}
    module_names: dict[tuple[int, str], str] = {}
    for name in sorted(tensors):
        match = _TENSOR_NAME.match(name)
        if (
            match is None
            or match["proj"] not in PROJECTIONS
            or match["parent"] != _PARENT[match["proj"]]
        ):
            raise _unsupported_tensor(name)
        layer, proj = int(match["layer"]), match["proj"]
        if layer >= model_config.num_layers:
            raise AdapterIncompatible(
                "layer_out_of_range",
                f"tensor {name} targets layer {layer} but the base model has "
                f"{model_config.num_layers} layers (0..{model_config.num_layers - 1}); "
                "the adapter was trained for a different base model",
            )
        if module_names.setdefault((layer, proj), match["module"]) != match["module"]:
            raise AdapterMalformed(
                "corrupt_weights", f"tensor {name} duplicates another module's tensor"
            )
        pairs.setdefault((layer, proj), {})[match["ab"]] = tensors[name]
    if not pairs:
        raise AdapterMalformed(
            "no_modules", "adapter_model.safetensors holds no lora_A/lora_B tensors"
        )

    order = {p: i for i, p in enumerate(PROJECTIONS)}
    modules = [
        _check_module(config, module_names[key], key, pairs[key], model_config)
        for key in sorted(pairs, key=lambda k: (k[0], order[k[1]]))
    ]
    rank = max(m.rank for m in modules)
    if rank > max_rank:
        worst = next(m for m in modules if m.rank == rank)
        raise AdapterIncompatible(
            "rank_too_large",
            f"adapter rank {rank} (tensor {worst.a_name}) exceeds this engine's max LoRA rank "
            f"{max_rank}; retrain with r <= {max_rank} or raise the engine's max_lora_rank",
        )
    present = {m.projection for m in modules}
    return AdapterSummary(
        rank=rank,
        alpha=config.lora_alpha,
        use_rslora=config.use_rslora,
        target_modules=tuple(p for p in PROJECTIONS if p in present),
        modules=tuple(modules),
        size_bytes=size_bytes,
        sha256=sha256,
        base_model_name_or_path=config.base_model_name_or_path,
        config_sha256=pinned.sha256,
    )


def _check_module(
    config: LoraAdapterConfig,
    module: str,
    key: tuple[int, str],
    pair: dict[str, TensorInfo],
    model_config: ModelConfig,
) -> LoraModuleSpec:
    layer, proj = key
    if "B" not in pair:
        raise AdapterMalformed(
            "missing_lora_b",
            f"tensor {pair['A'].name} has no matching lora_B tensor; the file is incomplete",
        )
    if "A" not in pair:
        raise AdapterMalformed(
            "missing_lora_a",
            f"tensor {pair['B'].name} has no matching lora_A tensor; the file is incomplete",
        )
    a, b = pair["A"], pair["B"]
    if not config.targets(module):
        raise AdapterMalformed(
            "config_mismatch",
            f"tensor {a.name} is for module {module}, which adapter_config.json does not "
            "target (target_modules / layers_to_transform / exclude_modules); the config "
            "and the weights do not belong together",
        )
    out_features, in_features = model_config.projection_shape(proj)
    rank = a.shape[0] if len(a.shape) == 2 else -1
    base = f"the base model's {proj} weight is [{out_features}, {in_features}] ([out, in])"
    if a.shape != (rank, in_features):
        raise _shape_error(a, [rank if rank > 0 else "r", in_features], base)
    if b.shape != (out_features, rank):
        raise _shape_error(b, [out_features, rank], base)
    if rank <= 0:
        raise AdapterIncompatible("shape_mismatch", f"tensor {a.name} has rank 0")
    expected_rank = config.rank_for(module)
    if rank != expected_rank:
        raise AdapterMalformed(
            "rank_mismatch",
            f"tensor {a.name} has rank {rank} but adapter_config.json gives module {module} "
            f"rank {expected_rank} (r / rank_pattern); fix adapter_config.json to match "
            "the weights",
        )
    return LoraModuleSpec(
        layer=layer,
        projection=proj,
        rank=rank,
        scaling=config.scaling_for(module, rank),
        a_name=a.name,
        b_name=b.name,
    )


def _shape_error(tensor: TensorInfo, expected: list[object], base: str) -> AdapterIncompatible:
    got = ", ".join(str(d) for d in tensor.shape)
    want = ", ".join(str(d) for d in expected)
    return AdapterIncompatible(
        "shape_mismatch",
        f"tensor {tensor.name} has shape [{got}], expected [{want}]: {base}; the adapter was "
        "trained for a different base model (hidden size, head counts or intermediate size differ)",
    )


def _unsupported_tensor(name: str) -> AdapterFormatError:
    if "lora_magnitude_vector" in name:
        return AdapterIncompatible(
            "dora", f"tensor {name} is a DoRA magnitude vector; DoRA adapters are not supported"
        )
    if ".lora_B.bias" in name or ".lora_A.bias" in name:
        return AdapterIncompatible(
            "unsupported_option",
            f"tensor {name} is a LoRA bias (lora_bias=true), which is not supported",
        )
    if "lora_" in name:
        return AdapterMalformed(
            "unsupported_module",
            f"tensor {name} targets a module other than {', '.join(PROJECTIONS)} (for example "
            "embed_tokens or lm_head); retrain with target_modules limited to those projections",
        )
    return AdapterMalformed(
        "unsupported_tensor",
        f"tensor {name} is not a LoRA weight (modules_to_save or trained base weights?); "
        "only lora_A/lora_B weights of the projections can be served",
    )
