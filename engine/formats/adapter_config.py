"""Parse a PEFT `adapter_config.json` and answer PEFT's own per-module questions.

PEFT decides per module name (e.g. `model.layers.3.self_attn.q_proj`) whether it is
targeted and which rank and alpha it gets; `targets`, `rank_for` and `alpha_for` copy
PEFT's matching rules (peft/tuners/tuners_utils.py `check_target_module_exists`,
peft/utils/other.py `get_pattern_key`) so that we scale every module exactly as PEFT
would. Torch-free: the control plane imports this at registration time.

A version is immutable as a whole: `read_pinned_config` hashes the very bytes it parses,
so a config rewritten after registration is refused rather than served.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.formats import patterns
from engine.formats.adapter_folder import CONFIG_FILE, config_file
from engine.formats.errors import (
    AdapterChanged,
    AdapterIncompatible,
    AdapterMalformed,
    AdapterUnsafePattern,
)
from engine.model.config import PROJECTIONS

# PEFT writes about 1 KB; anything near this is not an adapter config.
MAX_CONFIG_BYTES = 1 << 20
# PEFT's default targets for the Llama family when `target_modules` is null.
_DEFAULT_TARGETS = ("q_proj", "v_proj")
_ALL_LINEAR = "all-linear"
# Names a regex target must not match: we only serve LoRA on the seven projections.
_NON_PROJECTION_PROBES = ("model.embed_tokens", "lm_head")


@dataclass(frozen=True)
class LoraAdapterConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    # A tuple of names (PEFT list semantics), a regex string, or "all-linear".
    target_modules: tuple[str, ...] | str
    exclude_modules: tuple[str, ...] | str | None
    layers_to_transform: tuple[int, ...] | int | None
    layers_pattern: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would put a LoRA layer on `module_name` (full name in the model)."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if patterns.fullmatch(self.exclude_modules, module_name, "exclude_modules"):
                    return False
            elif any(_name_matches(k, module_name) for k in self.exclude_modules):
                return False
        if self.target_modules == _ALL_LINEAR:
            # PEFT expands "all-linear" into the full names of every linear layer except
            # the output head, and full names bypass `layers_to_transform`.
            return module_name.rsplit(".", 1)[-1] in PROJECTIONS
        if isinstance(self.target_modules, str):
            return patterns.fullmatch(self.target_modules, module_name, "target_modules")
        if module_name in self.target_modules:
            return True
        if not any(module_name.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == ():
            return True
        layer = _layer_index(module_name, self.layers_pattern)
        if layer is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return layer == self.layers_to_transform
        return layer in self.layers_to_transform

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str, rank: int) -> float:
        """PEFT's `scaling`: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


@dataclass(frozen=True)
class PinnedConfig:
    """A parsed config and the sha256 of the exact bytes it was parsed from."""

    config: LoraAdapterConfig
    sha256: str


def read_adapter_config(folder: Path) -> LoraAdapterConfig:
    """Read and check `folder/adapter_config.json`; AdapterFormatError on anything we
    cannot serve exactly as PEFT would."""
    return read_pinned_config(folder).config


def read_pinned_config(folder: Path, expected_sha256: str = "") -> PinnedConfig:
    """Read `folder/adapter_config.json` once, hash those bytes, compare the hash with
    `expected_sha256` (when given) and parse the same bytes, so the config served is
    the one hashed. AdapterChanged ("config_sha256_mismatch") when the file changed
    since it was pinned (checked before anything else), AdapterFilesMissing when it is
    absent, else as `parse_adapter_config`."""
    path = config_file(folder)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterMalformed("bad_config", f"cannot read {path}: {exc}") from exc
    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 and sha256 != expected_sha256.lower():
        raise AdapterChanged(
            "config_sha256_mismatch",
            f"{CONFIG_FILE} changed since registration (in {folder}: sha256 {sha256}, "
            f"registered {expected_sha256.lower()}); a version is immutable: register the "
            "changed adapter as a new version",
        )
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterMalformed(
            "bad_config", f"{path} is larger than {MAX_CONFIG_BYTES} bytes; it is not a PEFT config"
        )
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, 5000-digit numbers
        raise AdapterMalformed("bad_config", f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterMalformed("bad_config", f"{path} must hold a JSON object")
    return PinnedConfig(parse_adapter_config(raw), sha256)


def parse_adapter_config(raw: dict[str, Any]) -> LoraAdapterConfig:
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterMalformed(
            "not_lora",
            f"adapter_config.json has peft_type {peft_type!r}; only LoRA adapters "
            "(peft_type 'LORA') can be served",
        )
    if raw.get("use_dora"):
        raise AdapterIncompatible(
            "dora",
            "DoRA adapters (use_dora=true) are not supported; train a plain LoRA adapter "
            "or merge the DoRA weights into the base model",
        )
    if raw.get("modules_to_save"):
        raise AdapterIncompatible(
            "modules_to_save",
            f"modules_to_save={raw['modules_to_save']!r} is not supported: the adapter "
            "replaces whole base-model modules, which a shared base model cannot do; "
            "retrain without modules_to_save",
        )
    _refuse_options(raw)
    r = raw.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterMalformed(
            "bad_config", f"adapter_config.json: r must be a positive integer, got {r!r}"
        )
    alpha = _finite_number(raw.get("lora_alpha", 8), "lora_alpha")
    config = LoraAdapterConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=_parse_targets(raw.get("target_modules")),
        exclude_modules=_names_or_regex(raw.get("exclude_modules"), "exclude_modules"),
        layers_to_transform=_parse_layers(raw.get("layers_to_transform")),
        layers_pattern=_str_tuple(raw.get("layers_pattern"), "layers_pattern"),
        rank_pattern=_pattern(raw.get("rank_pattern"), "rank_pattern", int),
        alpha_pattern=_pattern(raw.get("alpha_pattern"), "alpha_pattern", float),
        base_model_name_or_path=str(raw.get("base_model_name_or_path") or ""),
    )
    _check_patterns(config)
    if isinstance(config.target_modules, str) and config.target_modules != _ALL_LINEAR:
        for probe in _NON_PROJECTION_PROBES:
            if config.targets(probe):
                raise _non_projection_error(probe)
    return config


def _check_patterns(config: LoraAdapterConfig) -> None:
    """Compile every pattern now, so a bad one is refused when the adapter is registered
    or loaded rather than when a module name first meets it."""
    if isinstance(config.target_modules, str) and config.target_modules != _ALL_LINEAR:
        patterns.compile_pattern(config.target_modules, "target_modules")
    if isinstance(config.exclude_modules, str):
        patterns.compile_pattern(config.exclude_modules, "exclude_modules")
    keyed = (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern))
    for field, by_key in keyed:
        if len(by_key) > patterns.MAX_PATTERN_KEYS:
            raise AdapterUnsafePattern(
                "bad_pattern",
                f"adapter_config.json: {field} has {len(by_key)} entries; at most "
                f"{patterns.MAX_PATTERN_KEYS} are accepted",
            )
        for key in by_key:
            patterns.compile_pattern(rf"(.*\.)?({key})$", f"{field} key {key!r}")
    for pattern in config.layers_pattern:
        patterns.compile_pattern(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", "layers_pattern")


def _refuse_options(raw: dict[str, Any]) -> None:
    """Options that change the forward pass in ways the serving kernels do not implement."""
    checks = (
        ("lora_bias", bool(raw.get("lora_bias")), "lora_bias=true (a bias on lora_B)"),
        ("bias", raw.get("bias", "none") not in (None, "none"), f"bias={raw.get('bias')!r}"),
        ("layer_replication", bool(raw.get("layer_replication")), "layer_replication"),
        ("target_parameters", bool(raw.get("target_parameters")), "target_parameters"),
        (
            "trainable_token_indices",
            bool(raw.get("trainable_token_indices")),
            "trainable_token_indices",
        ),
        ("alora_invocation_tokens", bool(raw.get("alora_invocation_tokens")), "aLoRA"),
        ("use_qalora", bool(raw.get("use_qalora")), "use_qalora=true"),
    )
    for key, present, what in checks:
        if present:
            raise AdapterIncompatible(
                "unsupported_option",
                f"adapter_config.json uses {what}, which is not supported; retrain without "
                f"{key!r} (only plain LoRA on q/k/v/o/gate/up/down_proj can be served)",
            )


def _parse_targets(value: Any) -> tuple[str, ...] | str:
    if value is None:
        return _DEFAULT_TARGETS
    if isinstance(value, str):
        return _ALL_LINEAR if value.lower() == _ALL_LINEAR else value
    names = _str_tuple(value, "target_modules")
    for name in names:
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            raise _non_projection_error(name)
    return names


def _non_projection_error(name: str) -> AdapterMalformed:
    return AdapterMalformed(
        "unsupported_module",
        f"adapter targets {name!r}, which is not a supported projection; LoRA can be "
        f"served only on {', '.join(PROJECTIONS)} (no embed_tokens or lm_head): retrain "
        "with target_modules limited to those",
    )


def _names_or_regex(value: Any, field: str) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value or None
    return _str_tuple(value, field)


def _str_tuple(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise AdapterMalformed(
            "bad_config", f"adapter_config.json: {field} must be a list of strings, got {value!r}"
        )
    return tuple(value)


def _parse_layers(value: Any) -> tuple[int, ...] | int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise AdapterMalformed(
        "bad_config",
        f"adapter_config.json: layers_to_transform must be an int or a list of ints, got {value!r}",
    )


def _pattern(value: Any, field: str, kind: type) -> dict[str, Any]:
    if not value:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
    ):
        raise AdapterMalformed(
            "bad_config", f"adapter_config.json: {field} must map names to numbers, got {value!r}"
        )
    if kind is int and not all(isinstance(v, int) and v > 0 for v in value.values()):
        raise AdapterMalformed(
            "bad_config", f"adapter_config.json: {field} ranks must be positive integers"
        )
    if kind is float:
        return {str(k): _finite_number(v, f"{field}[{k!r}]") for k, v in value.items()}
    return {str(k): kind(v) for k, v in value.items()}


def _finite_number(value: Any, field: str) -> float:
    """`value` as a finite float: JSON allows NaN, Infinity, 1e999 and 400-digit ints,
    and an infinite alpha scales every weight to Inf or NaN."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise AdapterMalformed(
            "bad_config", f"adapter_config.json: {field} must be a number, got {value!r}"
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise AdapterMalformed(
            "bad_config",
            f"adapter_config.json: {field} must be a finite number, not {str(value)[:40]}; "
            "fix it in adapter_config.json (PEFT's default is 8)",
        )
    return number


def _name_matches(key: str, module_name: str) -> bool:
    return module_name == key or module_name.endswith(f".{key}")


def _pattern_key(by_key: dict[str, Any], module_name: str) -> str | None:
    # PEFT: the first key (in file order) that matches as a regex on a dotted suffix.
    for key in by_key:
        if patterns.match(rf"(.*\.)?({key})$", module_name, f"pattern key {key!r}"):
            return key
    return None


def _layer_index(module_name: str, layers_pattern: tuple[str, ...]) -> int | None:
    # PEFT takes the first numbered segment after a `<pattern>.` (any segment if unset).
    if not layers_pattern:
        match = patterns.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name, "layers_pattern")
    else:
        match = None
        for pattern in layers_pattern:
            match = patterns.match(
                rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name, "layers_pattern"
            )
            if match is not None:
                break
    return int(match.group("idx")) if match else None
