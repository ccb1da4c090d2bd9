"""Fixed device slots holding the A/B weights of up to `max_loras` adapters.

Layout (what the LoRA kernels index), per group g in GROUPS and layer l:
- `lora_a[g][l]` `[S, n_slices, r_max, in]`: slice i holds projection i's A `[r, in]`
  in its first r rows (q,k,v for "qkv"; gate,up for "gate_up"; one slice otherwise).
- `lora_b[g][l]` `[S, total_out, r_max]`: projection i's B_scaled `[out_i, r]` at rows
  `slice_offsets[g][i]:slice_offsets[g][i+1]`, first r columns.
- `slot_ranks` `[S]` int32 on the host: the rank loaded in each slot, 0 when empty;
  `slot_versions` counts each slot's writes (for copies of a slot kept elsewhere).
Everything not loaded (padding rows/columns, untargeted projections and layers, empty
slots) is zero, so a kernel may read a whole `r_max` and still add nothing spurious.

All buffers are allocated once here; loading a slot copies an adapter's packed host
image (`peft_format.LoraWeights`, same layout at the adapter's own rank) into them: a
handful of large copies per slot, not one per module. On CUDA slot writes run on a
side stream behind an event, and the runner must call `wait_pending(stream)` before
its next forward; on the CPU they are synchronous.
Which adapter goes to which slot is the scheduler's decision, kept beside the pool
in `engine.lora.slots`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from engine.lora.layout import GROUPS, SLICE_OF, group_layouts
from engine.lora.peft_format import LoraWeights
from engine.model.config import ModelConfig

__all__ = ["GROUPS", "SLICE_OF", "LoraSlotPool", "SlotLoad"]


@dataclass
class SlotLoad:
    """Handle of one slot write. `event` is None when the write already happened (CPU)."""

    slot: int
    event: torch.cuda.Event | None = None
    # Host tensors the asynchronous copy reads; kept alive until the copy is waited on.
    sources: list[torch.Tensor] = field(default_factory=list)

    def done(self) -> bool:
        return self.event is None or self.event.query()


class LoraSlotPool:
    def __init__(
        self,
        model_config: ModelConfig,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if max_loras <= 0 or max_rank <= 0:
            raise ValueError(
                f"max_loras and max_rank must be positive, got {max_loras}, {max_rank}"
            )
        self.model_config = model_config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device)
        num_layers = model_config.num_layers
        layouts = group_layouts(model_config)
        self.slice_offsets = {g: layout.slice_offsets for g, layout in layouts.items()}
        self.in_features = {g: layout.in_features for g, layout in layouts.items()}
        self.lora_a: dict[str, torch.Tensor] = {}
        self.lora_b: dict[str, torch.Tensor] = {}
        # Flat device buffers, one slot at max_rank per group: the landing place of the
        # host image's copies (viewed at the image's own rank, so each is one plain memcpy).
        self._staging_a: dict[str, torch.Tensor] = {}
        self._staging_b: dict[str, torch.Tensor] = {}
        for group, layout in layouts.items():
            a_shape = layout.a_shape(num_layers, max_rank)  # [L, n_slices, r_max, in]
            b_shape = layout.b_shape(num_layers, max_rank)  # [L, total_out, r_max]
            # [L, S, n_slices, r_max, in] and [L, S, total_out, r_max]
            self.lora_a[group] = torch.zeros(
                a_shape[0], max_loras, *a_shape[1:], dtype=dtype, device=self.device
            )
            self.lora_b[group] = torch.zeros(
                b_shape[0], max_loras, *b_shape[1:], dtype=dtype, device=self.device
            )
            if self.device.type == "cuda":
                self._staging_a[group] = torch.empty(
                    self.lora_a[group][:, 0].numel(), dtype=dtype, device=self.device
                )
                self._staging_b[group] = torch.empty(
                    self.lora_b[group][:, 0].numel(), dtype=dtype, device=self.device
                )
        self.slot_ranks = torch.zeros(max_loras, dtype=torch.int32)  # [S] host
        self.slot_versions = [0] * max_loras
        self._pending: list[SlotLoad] = []
        self._stream: torch.cuda.Stream | None = None
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(device=self.device)

    def layer_weights(self, layer: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(lora_a [S, n_slices, r_max, in], lora_b [S, total_out, r_max])` of one layer."""
        return self.lora_a[group][layer], self.lora_b[group][layer]

    def load_into_slot(self, slot: int, weights: LoraWeights) -> SlotLoad:
        """Replace whatever `slot` held with `weights` (copies only, no pool allocation).

        On CUDA: per group one host-to-device copy of A and of B into staging, a device
        copy into the slot and a zero fill of the rank beyond the adapter's, all on the
        side stream. Truly asynchronous when the image is pinned; a pure memcpy when it
        is in the pool's dtype (another dtype is cast on the device)."""
        self._check_slot(slot)
        self.slot_versions[slot] += 1
        if weights.rank > self.max_rank:
            raise ValueError(
                f"adapter rank {weights.rank} exceeds the pool's max_rank {self.max_rank}"
            )
        if self._stream is None:
            for group in GROUPS:
                self._write_group(slot, group, weights.groups.get(group))
            self.slot_ranks[slot] = weights.rank
            return SlotLoad(slot=slot)
        handle = SlotLoad(slot=slot, sources=[t for pair in weights.groups.values() for t in pair])
        with self._on_side_stream(handle):
            for group in GROUPS:
                image = weights.groups.get(group)
                if image is not None:
                    a, b = image
                    staged_a = self._staging_a[group][: a.numel()].view(a.shape)
                    staged_b = self._staging_b[group][: b.numel()].view(b.shape)
                    staged_a.copy_(a, non_blocking=True)
                    staged_b.copy_(b, non_blocking=True)
                    image = (staged_a, staged_b)
                self._write_group(slot, group, image)
        self.slot_ranks[slot] = weights.rank
        return handle

    def _write_group(
        self, slot: int, group: str, image: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        """Slot `slot` of `group` := `image` (A [L, n, r, in], B [L, total_out, r]) padded
        with zeros to max_rank, or all zeros when the image is None."""
        dst_a = self.lora_a[group][:, slot]  # [L, n_slices, r_max, in]
        dst_b = self.lora_b[group][:, slot]  # [L, total_out, r_max]
        if image is None:
            dst_a.zero_()
            dst_b.zero_()
            return
        a, b = image
        rank = a.shape[2]
        dst_a[:, :, :rank].copy_(a)
        dst_a[:, :, rank:].zero_()
        dst_b[:, :, :rank].copy_(b)
        dst_b[:, :, rank:].zero_()

    def clear_slot(self, slot: int) -> SlotLoad:
        """Zero `slot` and set its rank to 0."""
        self._check_slot(slot)
        self.slot_versions[slot] += 1
        handle = SlotLoad(slot=slot)
        if self._stream is None:
            for group in GROUPS:
                self.lora_a[group][:, slot].zero_()
                self.lora_b[group][:, slot].zero_()
        else:
            with self._on_side_stream(handle):
                for group in GROUPS:
                    self.lora_a[group][:, slot].zero_()
                    self.lora_b[group][:, slot].zero_()
        self.slot_ranks[slot] = 0
        return handle

    def wait_pending(
        self, stream: torch.cuda.Stream | None = None, slots: Collection[int] | None = None
    ) -> None:
        """Make `stream` (default: the current stream) wait for the slot writes issued so
        far, or only for those into `slots`: writes into other slots then keep running
        beside the work queued next. Cheap, never blocks the host; a no-op on the CPU."""
        if not self._pending:
            return
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        still_pending = []
        for handle in self._pending:
            assert handle.event is not None
            if slots is None or handle.slot in slots:
                stream.wait_event(handle.event)
            elif not handle.done():
                still_pending.append(handle)
        self._pending = still_pending

    def _on_side_stream(self, handle: SlotLoad) -> _SideStream:
        assert self._stream is not None
        return _SideStream(self, handle)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise IndexError(f"slot {slot} is out of range [0, {self.max_loras})")


class _SideStream:
    """Run slot writes on the pool's side stream after the work already queued on the
    current stream (a forward may still read the slot's old contents), and record an
    event the next forward waits on."""

    def __init__(self, pool: LoraSlotPool, handle: SlotLoad) -> None:
        self._pool = pool
        self._handle = handle
        self._context = torch.cuda.stream(pool._stream)

    def __enter__(self) -> None:
        assert self._pool._stream is not None
        self._pool._stream.wait_stream(torch.cuda.current_stream(self._pool.device))
        self._context.__enter__()

    def __exit__(self, *exc: object) -> None:
        event = torch.cuda.Event()
        event.record(self._pool._stream)
        self._context.__exit__(*exc)
        self._handle.event = event
        self._pool._pending.append(self._handle)
