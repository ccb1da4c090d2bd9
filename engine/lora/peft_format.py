"""Load a PEFT LoRA folder into its packed host image, ready for a device slot.

Contract of `load_adapter`: the folder passes
`engine.formats.adapter_header.validate_adapter_header` (same code, same header), its
weights are finite before and after scaling, its sha256 matches `expected_sha256` and
its adapter_config.json's sha256 matches `expected_config_sha256` when given (the
config is read once: the bytes hashed are the bytes parsed). The result holds, per
projection group, the adapter's whole slot image in the serving dtype (layout in
engine.lora.layout), with PEFT's scaling (alpha/r or alpha/sqrt(r), per module) folded
into B so that `delta = x @ A.T @ B_scaled.T` is exactly PEFT's LoRA output, and every
value of the image is finite in the serving dtype. The file is read once; its sha256 is
computed beside the decode, stands proven by the registered chunked sha256 (checked on
several threads), or is known from an earlier read of the unchanged file
(engine.lora.hashed_read). Each weight is written once into the image (B scaled on the
way) and the finiteness checks run on the packed tensors, one reduction each, all on the
loading thread alone (`engine.cpu_threads`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.cpu_threads import this_thread_only
from engine.formats.adapter_config import read_pinned_config
from engine.formats.adapter_folder import unreadable_weights, weights_file
from engine.formats.adapter_header import (
    AdapterSummary,
    LoraModuleSpec,
    check_sha256,
    header_from_bytes,
    summarize,
)
from engine.formats.errors import AdapterChanged, AdapterFormatError, AdapterMalformed
from engine.formats.safetensors_header import TensorInfo
from engine.lora.hashed_read import DigestMismatch, HashedRead, read_hashed
from engine.lora.layout import SLICE_OF, GroupLayout, group_layouts
from engine.model.config import ModelConfig

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's weights on the host, packed as its slot image; immutable once built.

    `groups[g] = (A [L, n_slices, r, in], B_scaled [L, total_out, r])`, contiguous, in
    `dtype`, r = `summary.rank`, for each group g with at least one targeted projection
    (a group absent here adds nothing). B_scaled is B * scaling computed in float32 (as
    PEFT does) and then cast once, so the image equals a float32 staging copy cast on
    the device. Rows a module does not use (rank below r, untargeted projections or
    layers) are zero.
    """

    summary: AdapterSummary
    groups: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    layouts: Mapping[str, GroupLayout]

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
        """Bytes of adapter_model.safetensors."""
        return self.summary.size_bytes

    @property
    def sha256(self) -> str:
        return self.summary.sha256

    @property
    def config_sha256(self) -> str:
        """Of the adapter_config.json bytes these weights were scaled by."""
        return self.summary.config_sha256

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.groups.values()))[0].dtype

    @property
    def nbytes(self) -> int:
        """Host bytes of the image."""
        return sum(a.nbytes + b.nbytes for a, b in self.groups.values())

    @property
    def modules(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Views of the image per targeted (layer, projection): `(A [r_m, in],
        B_scaled [out, r_m])` at the module's own rank r_m."""
        views = {}
        for spec in self.summary.modules:
            group, index = SLICE_OF[spec.projection]
            a, b = self.groups[group]
            begin, end = self.layouts[group].slice_offsets[index : index + 2]
            views[(spec.layer, spec.projection)] = (
                a[spec.layer, index, : spec.rank],
                b[spec.layer, begin:end, : spec.rank],
            )
        return views

    def pinned(self) -> LoraWeights:
        """A copy in page-locked memory (needs a CUDA build), so the slot pool can copy
        it to the device asynchronously. `load_adapter(pin_memory=True)` pins at once."""
        groups = {g: (a.pin_memory(), b.pin_memory()) for g, (a, b) in self.groups.items()}
        return dataclasses.replace(self, groups=groups)


def load_adapter(
    folder: Path,
    model_config: ModelConfig,
    max_rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    pin_memory: bool = False,
    expected_sha256: str = "",
    expected_config_sha256: str = "",
    expected_chunked_sha256: str = "",
) -> LoraWeights:
    """Read, validate, scale and pack the adapter in `folder` into a `dtype` image
    (page-locked when `pin_memory`); AdapterFormatError on any problem. With
    `expected_sha256`, `expected_chunked_sha256` (registered beside it) has the file
    checked on several threads instead of hashed in one pass."""
    folder = Path(folder)
    pinned = read_pinned_config(folder, expected_config_sha256)
    path = weights_file(folder)
    registered = None
    if expected_sha256 and expected_chunked_sha256:
        registered = (expected_sha256, expected_chunked_sha256)
    try:
        read = read_hashed(path, registered=registered)
    except OSError as exc:
        raise unreadable_weights(path, exc) from exc
    layouts = group_layouts(model_config)
    try:
        header = header_from_bytes(path, read.data)
        summary = summarize(pinned, header, model_config, max_rank, len(read.data), "")
        with this_thread_only():  # its cores go to the sha256 thread and the engine's
            groups = _pack(
                path, read.data, header, summary, layouts, model_config, dtype, pin_memory
            )
    except AdapterFormatError:
        # Another file than the one registered is the first thing to say.
        _checked_sha256(path, read, expected_sha256, expected_chunked_sha256)
        raise
    try:
        sha256 = _checked_sha256(path, read, expected_sha256, expected_chunked_sha256)
    finally:
        read.release()  # the image holds copies: the next read of this size reuses the buffer
    return LoraWeights(dataclasses.replace(summary, sha256=sha256), groups, layouts)


def _checked_sha256(path: Path, read: HashedRead, expected: str, expected_chunked: str) -> str:
    """The file's sha256; AdapterChanged when it is not the one registered."""
    try:
        sha256 = read.sha256()
    except DigestMismatch as exc:
        raise AdapterChanged(
            "sha256_mismatch",
            f"{path} has chunked sha256 {exc.actual} but {expected_chunked} was expected; "
            "the file changed since it was registered: register the new file as a new version",
        ) from None
    check_sha256(path, sha256, expected)
    return sha256


def _pack(
    path: Path,
    data: bytearray,
    header: dict[str, TensorInfo],
    summary: AdapterSummary,
    layouts: Mapping[str, GroupLayout],
    model_config: ModelConfig,
    dtype: torch.dtype,
    pin_memory: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The slot image of every targeted group, each weight written once (B scaled on the
    way); AdapterMalformed when a weight, or a scaled or cast one, is not finite."""
    num_layers, rank = model_config.num_layers, summary.rank
    groups = {}
    for group, layout in layouts.items():
        specs = [s for s in summary.modules if SLICE_OF[s.projection][0] == group]
        if not specs:
            continue
        # Zero-filling 80 MB costs as much as packing it: skip it when every row is written.
        full = len(specs) == num_layers * layout.num_slices and all(s.rank == rank for s in specs)
        alloc = torch.empty if full else torch.zeros
        a = alloc(layout.a_shape(num_layers, rank), dtype=dtype, pin_memory=pin_memory)
        b = alloc(layout.b_shape(num_layers, rank), dtype=dtype, pin_memory=pin_memory)
        groups[group] = (a, b)
        for spec in specs:
            a_rows, b_rows = _packed_rows(groups, layouts, spec)
            a_rows.copy_(_tensor(data, header[spec.a_name]))
            _scale_into(b_rows, _tensor(data, header[spec.b_name]), spec.scaling)
    # A non-finite source weight stays non-finite through the cast and the scaling, and
    # the rows not written are zeros: one reduction per packed tensor sees every problem.
    if not all(_all_finite(t) for pair in groups.values() for t in pair):
        _raise_non_finite(path, data, header, summary, layouts, groups, dtype)
    return groups


def _packed_rows(
    groups: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    layouts: Mapping[str, GroupLayout],
    spec: LoraModuleSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where one module's A `[r, in]` and scaled B `[out, r]` sit in its group's image."""
    group, index = SLICE_OF[spec.projection]
    begin, end = layouts[group].slice_offsets[index : index + 2]
    a, b = groups[group]
    return a[spec.layer, index, : spec.rank], b[spec.layer, begin:end, : spec.rank]


def _scale_into(packed: torch.Tensor, source: torch.Tensor, scaling: float) -> None:
    """`packed = source * scaling` rounded as PEFT does (multiplied in float32, then cast
    once to `packed`'s dtype), in one pass with no temporary where torch allows: a
    float32 source, or a bf16/f16 one into its own dtype (torch multiplies those in
    float32 and rounds once). Never writes `source`, a view of the bytes being hashed."""
    if source.dtype == torch.float32 or (
        source.dtype == packed.dtype and packed.dtype in (torch.bfloat16, torch.float16)
    ):
        torch.mul(source, scaling, out=packed)
    elif packed.dtype == torch.float32:
        packed.copy_(source)  # exact widening, then the float32 multiply in place
        packed.mul_(scaling)
    else:
        packed.copy_(source.float().mul_(scaling))  # .float() is a copy here


def _raise_non_finite(
    path: Path,
    data: bytearray,
    header: dict[str, TensorInfo],
    summary: AdapterSummary,
    layouts: Mapping[str, GroupLayout],
    groups: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
) -> None:
    """Name the first problem, checked in this order: a weight in the file, a scaled B,
    a cast A (each in the order of the modules)."""
    _check_finite(path, data, header, summary.modules)
    for group in layouts:
        for spec in summary.modules:
            if SLICE_OF[spec.projection][0] != group:
                continue
            if not _all_finite(_packed_rows(groups, layouts, spec)[1]):
                # Finite weights times a finite but huge alpha/r overflow (in float32, or
                # in the cast to a narrower serving dtype): Inf here means garbage served.
                raise AdapterMalformed(
                    "non_finite",
                    f"tensor {spec.b_name} scaled by lora_alpha/r = {spec.scaling:.3g} is "
                    f"not finite in {dtype}; lora_alpha (or alpha_pattern) in "
                    "adapter_config.json is far too large for these weights: fix it",
                )
    for spec in summary.modules:
        if not _all_finite(_packed_rows(groups, layouts, spec)[0]):
            raise AdapterMalformed(
                "non_finite",
                f"tensor {spec.a_name} in {path} has values beyond the range of {dtype}, "
                "the serving dtype: serve it in a wider dtype or retrain",
            )
    raise AdapterMalformed("non_finite", f"{path} holds weights that are not finite")


def _check_finite(
    path: Path, data: bytearray, header: dict[str, TensorInfo], specs: tuple[LoraModuleSpec, ...]
) -> None:
    """Every weight in the file is finite; else name the first one that is not."""
    for spec in specs:
        for name in (spec.a_name, spec.b_name):
            tensor = _tensor(data, header[name])
            if not _all_finite(tensor):
                bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                raise AdapterMalformed(
                    "non_finite",
                    f"tensor {name} in {path} contains {bad} values; the training run "
                    "diverged — use an earlier checkpoint or retrain",
                )


def _all_finite(tensor: torch.Tensor) -> bool:
    # min and max propagate NaN and hold any ±Inf: one pass with no temporary tensor,
    # about 30x faster than isfinite().all() on 40M bf16 values.
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _tensor(data: bytearray, info: TensorInfo) -> torch.Tensor:
    """A view of `info`'s tensor inside `data`."""
    return _flat(data, info.dtype, info.offset, math.prod(info.shape)).view(info.shape)


def _flat(data: bytearray, dtype_name: str, offset: int, count: int) -> torch.Tensor:
    """`count` elements of `dtype_name` at byte `offset` of `data`, without a copy unless
    the offset is misaligned for the dtype."""
    dtype = _DTYPES[dtype_name]
    if offset % dtype.itemsize:  # a writer that does not align: copy these bytes
        data = bytearray(memoryview(data)[offset : offset + count * dtype.itemsize])
        offset = 0
    return torch.frombuffer(data, dtype=dtype, count=count, offset=offset)
