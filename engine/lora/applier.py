"""The model's LoRA hook for one step: each token's adapter delta after each projection.

The runner builds one `MultiLoraApplier` per step from the step's per-token slots; the
model calls `apply(layer, group, x, out)` right after each base projection. Everything
that depends only on the batch (token grouping, kernel form, scratch buffer) is done
once here, so the per-layer cost is the kernel launches alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from engine.kernels.lora_ops import (
    MAX_SPLIT_K,
    Backend,
    Form,
    add_lora,
    choose_form,
    default_backend,
    lora_expand,
)
from engine.kernels.meta import LoraKernelMeta, build_meta
from engine.lora.slot_pool import LoraSlotPool
from engine.model.lora_hook import PROJECTION_GROUPS

if TYPE_CHECKING:
    from engine.model.llama import DecoderLayer

_MAX_GROUP_SLICES = max(len(p) for p in PROJECTION_GROUPS.values())


class MultiLoraApplier:
    """Adds LoRA deltas in place for one step's flat batch of tokens.

    `token_slots[t]` is token t's slot in `pool` or -1 for the base model alone. The
    pool's slot contents must not change while this step runs (the runner calls
    `pool.wait_pending()` before the forward and loads slots only between steps).
    """

    def __init__(
        self,
        pool: LoraSlotPool,
        token_slots: Sequence[int] | torch.Tensor,
        backend: Backend | None = None,
    ) -> None:
        meta = build_meta(token_slots, pool.slot_ranks, pool.device)
        self._setup(pool, meta, backend or default_backend(pool.device), choose_form(meta))

    @classmethod
    def from_meta(
        cls,
        pool: LoraSlotPool,
        meta: LoraKernelMeta,
        backend: Backend,
        form: Form,
        folded: bool = False,
    ) -> MultiLoraApplier:
        """An applier over a prebuilt `meta` with a fixed `form`: e.g. a CUDA graph's,
        whose device tensors are refilled between replays and whose host fields are
        bounds (see `engine.cuda_graphs`). `folded`: the model's spare rows hold the A
        of the one slot the step's tokens use, and the model calls `expand`."""
        applier = cls.__new__(cls)
        applier._setup(pool, meta, backend, form)
        applier.folded = folded
        return applier

    def _setup(
        self, pool: LoraSlotPool, meta: LoraKernelMeta, backend: Backend, form: Form
    ) -> None:
        self.pool = pool
        self.backend: Backend = backend
        self.meta: LoraKernelMeta = meta
        self.form: Form = form
        self.folded = False
        self._h: torch.Tensor | None = None
        if self.meta.num_active and self.backend != "torch":
            # One float32 scratch for the shrink output, shared by every layer and group:
            # `MAX_SPLIT_K` planes (a split-K shrink writes one per split, and never
            # more), each `[num_tokens, n_slices, max_rank]` for the widest group. Never
            # zero-filled: the kernels only read entries they wrote in the same group.
            self._h = torch.empty(
                MAX_SPLIT_K * self.meta.num_tokens * _MAX_GROUP_SLICES * pool.max_rank,
                dtype=torch.float32,
                device=pool.device,
            )

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """`out += LoRA(x)` for every token with a slot; other rows stay bit-identical.

        x: `[num_tokens, in]` input of the group's projection(s); out:
        `[num_tokens, total_out]` the base projection's output, both in the pool's dtype.
        """
        if not self.meta.num_active:
            return
        lora_a, lora_b = self.pool.layer_weights(layer, group)
        h = None
        if self._h is not None:
            shape = (MAX_SPLIT_K, self.meta.num_tokens, lora_a.shape[1], self.pool.max_rank)
            h = self._h[: math.prod(shape)].view(shape)
        add_lora(
            x,
            lora_a,
            lora_b,
            out,
            self.pool.slice_offsets[group],
            self.meta,
            backend=self.backend,
            form=self.form,
            h=h,
        )

    def expand(self, layer: int, group: str, h: torch.Tensor, out: torch.Tensor) -> None:
        """`out += h @ B` for every token with a slot, where `h` `[num_tokens, n_slices *
        r_max]` is the folded shrink's output (see `LoraApplier`)."""
        if not self.meta.num_active:
            return
        _, lora_b = self.pool.layer_weights(layer, group)
        planes = h.unflatten(1, (-1, self.pool.max_rank)).unsqueeze(0)  # [1, T, n, r_max]
        offsets = self.pool.slice_offsets[group]
        lora_expand(planes, lora_b, out, offsets, self.meta, self.form, backend=self.backend)


def fold_slot(layers: Sequence[DecoderLayer], pool: LoraSlotPool, slot: int) -> None:
    """Copy `slot`'s A rows into every layer's spare rows (`DecoderLayer.fold_rows`, at
    the pool's `max_rank`): what a folded applier for that slot expects. Queued on the
    current stream, behind whatever it already holds."""
    groups = list(PROJECTION_GROUPS)
    rows = [layer.fold_rows(g) for layer in layers for g in groups]
    a = [pool.lora_a[g][i, slot].flatten(0, 1) for i in range(len(layers)) for g in groups]
    torch._foreach_copy_(rows, a)
