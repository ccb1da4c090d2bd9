"""A Hugging Face model folder's safetensors files, and the base-model fingerprint read
from their headers (torch-free).

The control plane fingerprints a base model when it is registered and each engine
fingerprints the model it serves; the two match engines to base models, so both call
this one function. Loading the weights is `engine.model.loader`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from engine.formats.safetensors_header import (
    CHECKPOINT_LIMITS,
    SafetensorsHeaderError,
    TensorInfo,
    read_header_from_file,
)
from engine.model.config import ModelConfig, ModelFormatError

INDEX_FILE = "model.safetensors.index.json"
# Bytes of each tensor's data that enter the fingerprint: enough to tell fine-tunes of
# one architecture apart without reading gigabytes.
_FINGERPRINT_SAMPLE_BYTES = 4096


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of `folder`: those its index names, else every `*.safetensors`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"model folder {folder} does not exist")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise ModelFormatError(f"{INDEX_FILE} names shard {path.name}, which is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        if not path.is_file():  # a FIFO or a device would block the read or never end
            raise ModelFormatError(f"{path} is not a regular file; weight files must be")
    if files:
        return files
    other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    if other:
        raise ModelFormatError(
            f"{folder} has no *.safetensors weights, only {', '.join(other[:3])}; "
            "convert it with transformers' save_pretrained(..., safe_serialization=True)"
        )
    raise ModelFormatError(f"{folder} has no *.safetensors weight files")


def model_fingerprint(config: ModelConfig, folder: Path) -> str:
    """A sha256 hex identifying the base model, independent of where it is stored.

    Covers the architecture (every ModelConfig field but the folder name), and each
    checkpoint tensor's name, dtype, shape and first bytes of data, sorted by name, read
    from safetensors headers without loading weights. Copies hash equal; sharding the
    same tensors differently does not change it. ModelFormatError for a file that is
    not valid safetensors.
    """
    architecture = {k: v for k, v in dataclasses.asdict(config).items() if k != "name"}
    tensors: dict[str, list[Any]] = {}
    for path in checkpoint_files(folder):
        with path.open("rb") as handle:
            for info in _header(path).values():
                handle.seek(info.offset)
                sample = handle.read(min(info.nbytes, _FINGERPRINT_SAMPLE_BYTES))
                sample_hash = hashlib.sha256(sample).hexdigest()
                tensors[info.name] = [info.dtype, list(info.shape), sample_hash]
    payload = json.dumps(
        {"architecture": architecture, "tensors": sorted(tensors.items())}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _header(path: Path) -> dict[str, TensorInfo]:
    try:
        return read_header_from_file(path, CHECKPOINT_LIMITS)[0]
    except SafetensorsHeaderError as exc:
        raise ModelFormatError(str(exc)) from exc
