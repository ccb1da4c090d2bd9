"""PEFT adapter folders load with PEFT's own module selection, ranks and scaling: the
folded delta `x @ A.T @ B_scaled.T` equals the delta of PEFT's LoRA module itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from engine.formats.adapter_header import validate_adapter_header
from engine.formats.chunked_digest import chunked_sha256
from engine.lora.peft_format import LoraWeights, load_adapter
from engine.model.config import PROJECTIONS, ModelConfig
from tests.adapter_factory import make_peft_adapter

MAX_RANK = 16

VARIANTS = {
    "list_qv": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_linear_rslora": dict(r=8, alpha=16, target_modules="all-linear", use_rslora=True),
    "regex": dict(r=4, alpha=4, target_modules=r".*\.(k_proj|down_proj)"),
    "layer_int": dict(
        r=2, alpha=8, target_modules=["o_proj", "gate_proj", "up_proj"], layers_to_transform=1
    ),
    "layer_list": dict(
        r=4, alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[0]
    ),
    "patterns": dict(
        r=4,
        alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.up_proj": 12},
        alpha_pattern={"v_proj": 32, "model.layers.0.self_attn.o_proj": 1},
    ),
    "patterns_rslora": dict(
        r=6,
        alpha=12,
        target_modules=["q_proj", "gate_proj"],
        use_rslora=True,
        rank_pattern={"gate_proj": 3},
    ),
}


def peft_modules(base_dir: Path, adapter_dir: Path) -> dict[tuple[int, str], torch.nn.Module]:
    """PEFT's own LoRA layers of the adapter, keyed like LoraWeights.modules."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parts = name.split(".")
            found[(int(parts[parts.index("layers") + 1]), parts[-1])] = module
    return found


def assert_matches_peft(weights: LoraWeights, base_dir: Path, adapter_dir: Path) -> None:
    modules = peft_modules(base_dir, adapter_dir)
    assert set(weights.modules) == set(modules)
    generator = torch.Generator().manual_seed(0)
    for key, (a, b_scaled) in weights.modules.items():
        module = modules[key]
        assert a.dtype == b_scaled.dtype == torch.float32
        x = torch.randn(5, a.shape[1], generator=generator)  # [tokens, in] f32
        with torch.no_grad():
            expected = module(x) - module.get_base_layer()(x)  # PEFT's LoRA delta
        got = x @ a.T @ b_scaled.T
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"module {key}")
        assert expected.abs().max() > 1e-3  # the adapter is not a no-op


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_delta_equals_peft(
    variant: str, base_dir: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    kwargs = VARIANTS[variant]
    adapter_dir = make_peft_adapter(base_dir, tmp_path / variant, seed=1, **kwargs)
    weights = load_adapter(adapter_dir, model_config, MAX_RANK)
    assert_matches_peft(weights, base_dir, adapter_dir)

    ranks = {spec.rank for spec in weights.summary.modules}
    assert weights.rank == max(ranks)
    assert weights.alpha == kwargs["alpha"]
    assert set(weights.target_modules) <= set(PROJECTIONS)
    assert weights.size_bytes == (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert len(weights.sha256) == 64
    for (_, proj), (a, b) in weights.modules.items():
        out_features, in_features = model_config.projection_shape(proj)
        assert a.shape[1] == in_features and b.shape[0] == out_features and a.shape[0] == b.shape[1]

    header = validate_adapter_header(adapter_dir, model_config, MAX_RANK, compute_sha256=True)
    # Registration also computes the chunked digest, which a load only checks.
    data = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert header.chunked_sha256 == chunked_sha256(data)
    assert dataclasses.replace(header, chunked_sha256="") == weights.summary


def test_variant_details(base_dir: Path, model_config: ModelConfig, tmp_path: Path) -> None:
    weights = load_adapter(
        make_peft_adapter(base_dir, tmp_path / "p", seed=2, **VARIANTS["patterns"]),
        model_config,
        MAX_RANK,
    )
    ranks = {(s.layer, s.projection): s.rank for s in weights.summary.modules}
    assert ranks[(0, "q_proj")] == ranks[(1, "q_proj")] == 2
    assert ranks[(1, "up_proj")] == 12 and ranks[(0, "up_proj")] == 4
    assert weights.rank == 12
    assert weights.target_modules == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
        "down_proj",
    )

    only_layer_1 = load_adapter(
        make_peft_adapter(base_dir, tmp_path / "l", seed=2, **VARIANTS["layer_int"]),
        model_config,
        MAX_RANK,
    )
    assert {layer for layer, _ in only_layer_1.modules} == {1}
    assert only_layer_1.target_modules == ("o_proj", "gate_proj", "up_proj")


def test_handwritten_all_linear_and_missing_peft_type(
    base_dir: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    """PEFT saves "all-linear" expanded to module names; a hand-written config may keep
    the shorthand (and omit peft_type): same adapter, same weights."""
    adapter_dir = make_peft_adapter(
        base_dir, tmp_path / "a", seed=3, r=4, alpha=8, target_modules="all-linear"
    )
    expanded = load_adapter(adapter_dir, model_config, MAX_RANK)
    config_path = adapter_dir / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    raw["target_modules"] = "all-linear"
    del raw["peft_type"]
    config_path.write_text(json.dumps(raw))
    shorthand = load_adapter(adapter_dir, model_config, MAX_RANK)
    assert set(shorthand.modules) == set(expanded.modules)
    assert len(shorthand.modules) == 7 * model_config.num_layers
    for key, (a, b) in expanded.modules.items():
        assert torch.equal(shorthand.modules[key][0], a) and torch.equal(
            shorthand.modules[key][1], b
        )


def test_bf16_adapter_loads_as_float32(
    base_dir: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    adapter_dir = make_peft_adapter(
        base_dir, tmp_path / "b", seed=4, r=4, alpha=8, target_modules=["q_proj"]
    )
    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    weights = load_adapter(adapter_dir, model_config, MAX_RANK)
    assert all(a.dtype == torch.float32 for a, _ in weights.modules.values())
    assert_matches_peft(weights, base_dir, adapter_dir)


def test_header_validation_is_torch_free() -> None:
    """The control plane imports the header validator without pulling in torch."""
    import subprocess
    import sys

    code = (
        "import sys; import engine.formats.adapter_header, engine.lora.errors; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def per_module_image(
    weights: LoraWeights, model_config: ModelConfig, dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The slot image built the old way: zeros, then each float32 module cast into its rows."""
    from engine.lora.layout import SLICE_OF, group_layouts

    layouts = group_layouts(model_config)
    groups = {SLICE_OF[proj][0] for _, proj in weights.modules}
    image = {
        g: (
            torch.zeros(layouts[g].a_shape(model_config.num_layers, weights.rank), dtype=dtype),
            torch.zeros(layouts[g].b_shape(model_config.num_layers, weights.rank), dtype=dtype),
        )
        for g in groups
    }
    for (layer, proj), (a, b) in weights.modules.items():
        group, index = SLICE_OF[proj]
        begin, end = layouts[group].slice_offsets[index : index + 2]
        image[group][0][layer, index, : a.shape[0]] = a.to(dtype)
        image[group][1][layer, begin:end, : b.shape[1]] = b.to(dtype)
    return image


@pytest.mark.parametrize("variant", ["patterns", "layer_int"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_image_in_the_serving_dtype_equals_the_float32_modules_cast(
    variant: str, dtype: torch.dtype, base_dir: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    """Packed straight into the serving dtype (scaling applied in float32 first), the
    image holds exactly what casting the float32 modules would: per group at the
    adapter's rank, zero wherever a module has no rows; untargeted groups absent."""
    adapter_dir = make_peft_adapter(base_dir, tmp_path / variant, seed=5, **VARIANTS[variant])
    reference = load_adapter(adapter_dir, model_config, MAX_RANK)
    packed = load_adapter(adapter_dir, model_config, MAX_RANK, dtype=dtype)
    assert packed.dtype == dtype and packed.sha256 == reference.sha256
    expected = per_module_image(reference, model_config, dtype)
    assert set(packed.groups) == set(expected)
    for group, (a, b) in packed.groups.items():
        assert a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, expected[group][0]) and torch.equal(b, expected[group][1]), group
    assert packed.nbytes == sum(a.nbytes + b.nbytes for a, b in expected.values())
    if variant == "layer_int":  # o_proj, gate_proj, up_proj of layer 1 only
        assert set(packed.groups) == {"o", "gate_up"}
        assert not packed.groups["o"][0][0].any() and packed.groups["o"][0][1].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_bf16_file_packs_as_its_float32_load_cast(
    dtype: torch.dtype, base_dir: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    adapter_dir = make_peft_adapter(base_dir, tmp_path / "b", seed=6, **VARIANTS["patterns"])
    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    reference = load_adapter(adapter_dir, model_config, MAX_RANK)
    packed = load_adapter(adapter_dir, model_config, MAX_RANK, dtype=dtype)
    expected = per_module_image(reference, model_config, dtype)
    for group, (a, b) in packed.groups.items():
        assert torch.equal(a, expected[group][0]) and torch.equal(b, expected[group][1]), group


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16, torch.float32])
def test_scaling_rounds_once_from_float32(source: torch.dtype, target: torch.dtype) -> None:
    """B is scaled in one pass where torch allows, yet bit for bit as PEFT does it: the
    float32 product cast once (every bf16/f16 bit pattern; NaN only as NaN, its payload
    depends on the kernel and a NaN is refused anyway)."""
    from engine.lora.peft_format import _scale_into

    if source == torch.float32:
        generator = torch.Generator().manual_seed(0)
        values = torch.randn(1 << 16, generator=generator) * torch.logspace(-40, 38, 1 << 16)
    else:
        values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(source)
    values = values.view(-1, 8)  # [out, r]
    bits = torch.int32 if target == torch.float32 else torch.int16

    def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
        nan = expected.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got.view(bits)[~nan], expected.view(bits)[~nan])

    for scaling in (2.0, 0.5, 1.7, 8 / 3, 1 / 3, 7.123456789, 1e30, 0.0):
        expected = (values.float() * scaling).to(target)
        packed = torch.empty(values.shape, dtype=target)
        _scale_into(packed, values, scaling)
        assert_same(packed, expected)
        wide = torch.zeros(values.shape[0], 16, dtype=target)  # strided, as at rank < r
        _scale_into(wide[:, :8], values, scaling)
        assert_same(wide[:, :8], expected)
        assert not wide[:, 8:].any()
