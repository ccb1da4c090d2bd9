"""Every adapter the engine cannot serve exactly is refused with a reason code and a
sentence naming the problem; the header-only validator refuses the same ones."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.formats.adapter_header import validate_adapter_header
from engine.formats.errors import AdapterFormatError
from engine.lora.peft_format import load_adapter
from engine.model.config import ModelConfig
from tests.adapter_factory import make_peft_adapter, make_tiny_llama

MAX_RANK = 8
WEIGHTS = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def good_adapter(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(
        base_dir,
        tmp_path_factory.mktemp("good"),
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        seed=0,
    )


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def set_value(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][0, 0] = value

    return edit


def edit_header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite the safetensors header's JSON (the tensor data stays as it is)."""

    def mutate(folder: Path) -> None:
        path = folder / WEIGHTS
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        edit(header)
        text = json.dumps(header).encode()  # allow_nan: writes Infinity as given
        path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_len :])

    return mutate


def huge_header(folder: Path) -> None:
    path = folder / WEIGHTS
    path.write_bytes((64 * 1024 * 1024).to_bytes(8, "little") + b" " * (64 * 1024 * 1024))


def truncate(folder: Path) -> None:
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])


# name -> (mutation of a copy of the good adapter, reason, message substrings, header sees it)
CASES: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...], bool]] = {
    "not_lora": (lambda d: edit_config(d, peft_type="IA3"), "not_lora", ("peft_type 'IA3'",), True),
    "dora_config": (lambda d: edit_config(d, use_dora=True), "dora", ("DoRA", "use_dora"), True),
    "modules_to_save": (
        lambda d: edit_config(d, modules_to_save=["lm_head"]),
        "modules_to_save",
        ("modules_to_save",),
        True,
    ),
    "target_embed": (
        lambda d: edit_config(d, target_modules=["q_proj", "embed_tokens"]),
        "unsupported_module",
        ("'embed_tokens'", "q_proj"),
        True,
    ),
    "target_regex_lm_head": (
        lambda d: edit_config(d, target_modules=r".*(q_proj|v_proj|down_proj|lm_head)"),
        "unsupported_module",
        ("'lm_head'",),
        True,
    ),
    "lm_head_tensor": (
        lambda d: edit_tensors(
            d,
            lambda t: t.update(
                {
                    "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                    "base_model.model.lm_head.lora_B.weight": torch.zeros(256, 4),
                }
            ),
        ),
        "unsupported_module",
        ("base_model.model.lm_head.lora_A.weight",),
        True,
    ),
    "lora_bias": (
        lambda d: edit_config(d, lora_bias=True),
        "unsupported_option",
        ("lora_bias",),
        True,
    ),
    "rank_too_large": (lambda d: None, "rank_too_large", ("rank 16", "max LoRA rank 8"), True),
    "rank_mismatch": (lambda d: edit_config(d, r=2), "rank_mismatch", ("rank 16", "rank 2"), True),
    "config_mismatch": (
        lambda d: edit_config(d, target_modules=["q_proj", "v_proj"]),
        "config_mismatch",
        ("down_proj",),
        True,
    ),
    "missing_lora_b": (
        lambda d: edit_tensors(d, lambda t: t.pop(Q_B)),
        "missing_lora_b",
        (Q_A, "no matching lora_B"),
        True,
    ),
    "missing_lora_a": (
        lambda d: edit_tensors(d, lambda t: t.pop(Q_A)),
        "missing_lora_a",
        (Q_B, "no matching lora_A"),
        True,
    ),
    "missing_config": (
        lambda d: (d / "adapter_config.json").unlink(),
        "missing_config",
        ("no adapter_config.json",),
        True,
    ),
    "missing_weights": (
        lambda d: (d / WEIGHTS).unlink(),
        "missing_weights",
        ("no adapter_model.safetensors",),
        True,
    ),
    "truncated": (truncate, "truncated_weights", ("truncated",), True),
    "corrupt": (
        lambda d: (d / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"),
        "corrupt_weights",
        ("not a valid safetensors file",),
        True,
    ),
    "empty_file": (
        lambda d: (d / WEIGHTS).write_bytes(b""),
        "truncated_weights",
        ("truncated",),
        True,
    ),
    "bad_json_config": (
        lambda d: (d / "adapter_config.json").write_text("{"),
        "bad_config",
        ("not valid JSON",),
        True,
    ),
    "nan": (
        lambda d: edit_tensors(d, set_value(Q_B, float("nan"))),
        "non_finite",
        (Q_B, "NaN"),
        False,
    ),
    "inf": (
        lambda d: edit_tensors(d, set_value(Q_A, float("inf"))),
        "non_finite",
        (Q_A, "Inf"),
        False,
    ),
    # Hostile patterns: refused at once, never run by a backtracking engine.
    "backtracking_target": (
        lambda d: edit_config(d, target_modules="(" + "a*" * 30 + ")+$(?<=b)"),
        "bad_pattern",
        ("target_modules", "list the module names instead"),
        True,
    ),
    "backreference_exclude": (
        lambda d: edit_config(d, exclude_modules=r"(q)\1_proj"),
        "bad_pattern",
        ("exclude_modules",),
        True,
    ),
    "invalid_rank_pattern_key": (
        lambda d: edit_config(d, rank_pattern={"q_proj[": 4}),
        "bad_pattern",
        ("rank_pattern",),
        True,
    ),
    "huge_pattern": (
        lambda d: edit_config(d, target_modules="q" * 5000),
        "bad_pattern",
        ("5000-character",),
        True,
    ),
    "infinite_shape": (
        edit_header(lambda h: h[Q_A].update(shape=[float("inf"), 64])),
        "corrupt_weights",
        (Q_A, "malformed"),
        True,
    ),
    "huge_offset": (
        edit_header(lambda h: h[Q_A].update(data_offsets=[0, 10**40])),
        "corrupt_weights",
        (Q_A, "malformed"),
        True,
    ),
    "float_dimension": (
        edit_header(lambda h: h[Q_A].update(shape=[4.5, 64])),
        "corrupt_weights",
        ("malformed",),
        True,
    ),
    "huge_header": (huge_header, "corrupt_weights", ("implausible",), True),
    "int_dtype": (
        lambda d: edit_tensors(d, lambda t: t.update({Q_A: t[Q_A].to(torch.int32)})),
        "unsupported_dtype",
        (Q_A, "I32"),
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejection(
    case: str, good_adapter: Path, base_dir: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    mutate, reason, substrings, header_sees_it = CASES[case]
    folder = tmp_path / "adapter"
    if case in ("rank_too_large", "rank_mismatch"):
        make_peft_adapter(base_dir, folder, r=16, alpha=16, target_modules=["q_proj"], seed=1)
    else:
        shutil.copytree(good_adapter, folder)
    mutate(folder)
    with pytest.raises(AdapterFormatError) as full:
        load_adapter(folder, model_config, MAX_RANK)
    assert isinstance(full.value, ValueError)
    assert full.value.reason == reason, str(full.value)
    for substring in substrings:
        assert substring in str(full.value)
    if header_sees_it:
        with pytest.raises(AdapterFormatError) as header:
            validate_adapter_header(folder, model_config, MAX_RANK)
        assert header.value.reason == reason
        assert str(header.value) == str(full.value)
    else:
        validate_adapter_header(folder, model_config, MAX_RANK)


def test_an_a_weight_beyond_the_serving_dtype_is_refused(
    good_adapter: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(good_adapter, folder)
    edit_tensors(folder, set_value(Q_A, 1e6))  # finite in float32, Inf in float16
    assert load_adapter(folder, model_config, MAX_RANK).groups
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(folder, model_config, MAX_RANK, dtype=torch.float16)
    assert caught.value.reason == "non_finite"
    assert Q_A in str(caught.value) and "torch.float16" in str(caught.value)


def test_real_dora_adapter_is_refused(
    base_dir: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    folder = make_peft_adapter(
        base_dir, tmp_path / "dora", r=4, alpha=8, target_modules=["q_proj"], seed=0, use_dora=True
    )
    with pytest.raises(AdapterFormatError, match="DoRA") as exc:
        load_adapter(folder, model_config, MAX_RANK)
    assert exc.value.reason == "dora"
    # Even with the flag removed, the magnitude tensors give it away.
    edit_config(folder, use_dora=False)
    with pytest.raises(AdapterFormatError, match="lora_magnitude_vector") as exc:
        load_adapter(folder, model_config, MAX_RANK)
    assert exc.value.reason == "dora"


def test_real_embedding_target_is_refused(
    base_dir: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    folder = make_peft_adapter(
        base_dir, tmp_path / "emb", r=4, alpha=8, target_modules=["embed_tokens", "q_proj"], seed=0
    )
    with pytest.raises(AdapterFormatError, match="embed_tokens") as exc:
        validate_adapter_header(folder, model_config, MAX_RANK)
    assert exc.value.reason == "unsupported_module"


def test_bin_adapter_is_refused_with_fix(
    base_dir: Path, model_config: ModelConfig, tmp_path: Path
) -> None:
    folder = make_peft_adapter(
        base_dir,
        tmp_path / "bin",
        r=4,
        alpha=8,
        target_modules=["q_proj"],
        seed=0,
        safe_serialization=False,
    )
    assert (folder / "adapter_model.bin").is_file()
    with pytest.raises(AdapterFormatError, match=r"safe_serialization=True") as exc:
        load_adapter(folder, model_config, MAX_RANK)
    assert exc.value.reason == "bin_weights"


def test_sha256_mismatch(good_adapter: Path, model_config: ModelConfig) -> None:
    wrong = "0" * 64
    with pytest.raises(AdapterFormatError, match=wrong) as exc:
        load_adapter(good_adapter, model_config, MAX_RANK, expected_sha256=wrong)
    assert exc.value.reason == "sha256_mismatch"
    with pytest.raises(AdapterFormatError, match=wrong):
        validate_adapter_header(good_adapter, model_config, MAX_RANK, expected_sha256=wrong)
    right = load_adapter(good_adapter, model_config, MAX_RANK).sha256
    assert (
        load_adapter(good_adapter, model_config, MAX_RANK, expected_sha256=right.upper()).sha256
        == right
    )


@pytest.mark.parametrize(
    ("overrides", "reason", "substrings"),
    [
        (
            {"hidden_size": 96},
            "shape_mismatch",
            ("q_proj.lora_A.weight", "[4, 96]", "expected [4, 64]"),
        ),
        (
            {"intermediate_size": 96},
            "shape_mismatch",
            ("down_proj.lora_A.weight", "[4, 96]", "expected [4, 128]"),
        ),
        (
            {"num_key_value_heads": 4},
            "shape_mismatch",
            ("v_proj.lora_B.weight", "[64, 4]", "expected [32, 4]"),
        ),
        ({"num_hidden_layers": 3}, "layer_out_of_range", ("layers.2.", "layer 2", "2 layers")),
    ],
)
def test_other_base_model_is_refused(
    overrides: dict[str, int],
    reason: str,
    substrings: tuple[str, ...],
    model_config: ModelConfig,
    tmp_path: Path,
) -> None:
    other_base = make_tiny_llama(tmp_path / "other", **overrides)
    folder = make_peft_adapter(
        other_base,
        tmp_path / "a",
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        seed=0,
    )
    for validate in (load_adapter, validate_adapter_header):
        with pytest.raises(AdapterFormatError) as exc:
            validate(folder, model_config, MAX_RANK)
        assert exc.value.reason == reason, str(exc.value)
        for substring in substrings:
            assert substring in str(exc.value)


def test_a_catastrophic_regex_is_matched_in_linear_time_or_not_at_all() -> None:
    """`(a+)+$`-style targets are valid RE2, so they are matched, not refused; RE2 answers
    at once where Python's re would backtrack for hours on such a name."""
    from engine.formats.adapter_config import parse_adapter_config

    config = parse_adapter_config({"r": 4, "target_modules": r"(.*\.)*(q+)+_proj"})
    assert config.targets("model.layers.0.self_attn.q_proj")
    assert not config.targets("model.layers.0.self_attn." + "q" * 5000 + "x_proj")


def test_regex_targets_and_patterns_match_as_peft_does() -> None:
    from engine.formats.adapter_config import parse_adapter_config

    config = parse_adapter_config(
        {
            "r": 8,
            "target_modules": r".*\.(q_proj|down_proj)",
            "rank_pattern": {"layers\\.1\\.self_attn\\.q_proj": 2},
            "layers_pattern": "layers",
        }
    )
    assert config.targets("model.layers.1.self_attn.q_proj")
    assert not config.targets("model.layers.1.self_attn.k_proj")
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
