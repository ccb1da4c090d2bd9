"""Read and check a safetensors header without touching tensor data (torch-free).

Layout: 8 bytes little-endian u64 N, N bytes of JSON `{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data region, which the
offsets index relative to its start. We check what the safetensors library checks
(offsets in bounds and covering the region, sizes agreeing with dtype × shape) so a
file that passes here also loads there, and a truncated file is caught early.

One parser for both kinds of file read here, each with its own `HeaderLimits`:
LoRA adapters (small headers, float weights only) and base-model checkpoints.
Problems raise SafetensorsHeaderError; callers turn it into their own error type.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# Bytes per element of the safetensors dtypes that occupy whole bytes.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class HeaderLimits:
    """What a header of one kind of file may hold, so a hostile file cannot make a
    read parse a huge JSON document."""

    max_header_bytes: int
    max_tensors: int
    dtypes: tuple[str, ...]  # accepted tensor dtypes, each a key of DTYPE_SIZES


# LoRA headers hold ~150 bytes per tensor and two tensors per targeted module: a few
# hundred KB even for a 100-layer model. Far below the library's own 100 MB. Floats
# are all LoRA weights can be.
LORA_LIMITS = HeaderLimits(
    max_header_bytes=8 * 1024 * 1024, max_tensors=16384, dtypes=("F64", "F32", "F16", "BF16")
)
# Base-model checkpoints: the safetensors library's own header limit, any dtype.
CHECKPOINT_LIMITS = HeaderLimits(
    max_header_bytes=100 * 1024 * 1024, max_tensors=1 << 20, dtypes=tuple(DTYPE_SIZES)
)


class SafetensorsHeaderError(ValueError):
    """The file is not a valid safetensors file. `reason`: "corrupt_weights",
    "truncated_weights" or "unsupported_dtype"; the message names file and problem."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # byte offset of the tensor's data from the start of the file
    nbytes: int = 0  # bytes of the tensor's data


def read_header_from_file(
    path: Path, limits: HeaderLimits = LORA_LIMITS
) -> tuple[dict[str, TensorInfo], int]:
    """`({name: TensorInfo}, file_size)` of a safetensors file, reading only its header.
    OSError when the file cannot be read."""
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        header_len = _check_header_len(path, prefix, file_size, limits)
        header_bytes = handle.read(header_len)
    data_start = 8 + header_len
    return parse_header(path, header_bytes, file_size - data_start, data_start, limits), file_size


def read_header_from_bytes(
    path: Path, data: bytes, limits: HeaderLimits = LORA_LIMITS
) -> dict[str, TensorInfo]:
    """Same checks as `read_header_from_file`, on a file already read into memory."""
    header_len = _check_header_len(path, data[:8], len(data), limits)
    data_start = 8 + header_len
    return parse_header(path, data[8:data_start], len(data) - data_start, data_start, limits)


def parse_header(
    path: Path,
    header_bytes: bytes,
    data_len: int,
    data_start: int,
    limits: HeaderLimits = LORA_LIMITS,
) -> dict[str, TensorInfo]:
    """`{name: TensorInfo}` of a header whose data region (`data_len` bytes) begins at
    byte `data_start` of the file."""
    try:
        raw = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _corrupt(path, f"its header is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise _corrupt(path, "its header is not a JSON object")
    raw.pop("__metadata__", None)
    if len(raw) > limits.max_tensors:
        raise _corrupt(path, f"its header lists {len(raw)} tensors; at most {limits.max_tensors}")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in raw.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(_count(d) for d in entry["shape"])
            begin, end = (_count(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"its header entry for {name!r} is malformed") from exc
        if dtype not in limits.dtypes:
            raise SafetensorsHeaderError(
                "unsupported_dtype", f"tensor {name} in {path} has dtype {dtype}"
            )
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise _corrupt(path, f"the byte range of tensor {name} does not match its shape")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, end - begin)
        spans.append((begin, end, name))
    # The data region must be covered exactly, in order, with no gaps or overlaps.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _corrupt(path, f"tensor {name} does not start where the previous one ends")
        position = end
    if position > data_len:
        raise _truncated(
            path,
            f"its header describes {position} bytes of tensor data but only {data_len} are present",
        )
    if position != data_len:
        raise _corrupt(path, f"it has {data_len - position} trailing bytes after the tensor data")
    return tensors


def _count(value: object) -> int:
    """A JSON integer that can size or place bytes of a file: not a bool, a float (such
    as Infinity), negative, or beyond what a file can hold. ValueError otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"{value!r} is not a byte count or dimension")
    return value


def _check_header_len(path: Path, prefix: bytes, file_size: int, limits: HeaderLimits) -> int:
    if len(prefix) < 8:
        raise _truncated(path, "it is shorter than the 8-byte header length prefix")
    header_len = struct.unpack("<Q", prefix)[0]
    if header_len > limits.max_header_bytes:
        raise _corrupt(path, f"its header length prefix ({header_len}) is implausible")
    if header_len > file_size - 8:
        raise _truncated(path, f"its header needs {header_len} bytes but the file ends first")
    return header_len


def _corrupt(path: Path, what: str) -> SafetensorsHeaderError:
    return SafetensorsHeaderError(
        "corrupt_weights", f"{path} is not a valid safetensors file: {what}"
    )


def _truncated(path: Path, what: str) -> SafetensorsHeaderError:
    return SafetensorsHeaderError(
        "truncated_weights", f"{path} is truncated: {what}; copy or download the file again"
    )
