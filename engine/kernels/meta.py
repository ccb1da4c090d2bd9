"""Per-step token→adapter-slot metadata shared by every LoRA kernel launch of a step.

The runner builds one `LoraKernelMeta` per model step (on the host, once) and every
layer's shrink/expand reuses it. It groups the batch's tokens by adapter slot so that
SGMV kernels can tile over segments, and keeps the same grouping in host form so that
the torch reference and the launch heuristics never synchronise with the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.host_copy import to_device

NO_SLOT = -1  # token_slots value of a token served by the base model alone
MAX_SLICES = 4  # output slices of one projection group a kernel launch can cover


@dataclass(frozen=True)
class LoraKernelMeta:
    """Token grouping of one step's flat batch.

    Device tensors (int32, on the step's device):
    - `token_slots` `[T]`: adapter slot of each token, -1 for none.
    - `sorted_token_ids` `[T]`: token indices grouped by slot; the tokens of segment g
      are `sorted_token_ids[seg_starts[g]:seg_starts[g + 1]]` (ascending within a
      segment), and the tokens without an adapter come last, after `num_active`.
    - `seg_starts` `[G + 1]`, `seg_slots` `[G]`: one segment per distinct slot present
      (slot -1 excluded), in ascending slot order.
    - `slot_ranks` `[S]`: rank of every slot of the pool (0 for an empty slot).

    Host mirrors (`seg_starts_host`, `seg_slots_host`, `seg_ranks_host`) and the scalar
    summaries size the grids and drive the torch reference without device syncs.
    `max_rank` is the largest rank among the slots present: kernels never look at
    rank rows at or beyond it, so a pool with a large `r_max` costs nothing extra when
    the batch only uses small adapters.
    """

    token_slots: torch.Tensor  # [T] int32
    sorted_token_ids: torch.Tensor  # [T] int32
    seg_starts: torch.Tensor  # [G + 1] int32
    seg_slots: torch.Tensor  # [G] int32
    slot_ranks: torch.Tensor  # [S] int32
    num_tokens: int
    num_active: int
    max_seg_len: int
    max_rank: int
    seg_starts_host: tuple[int, ...]
    seg_slots_host: tuple[int, ...]
    seg_ranks_host: tuple[int, ...]
    # True for a CUDA graph's meta: the device tensors are refilled before each replay,
    # so the host fields are bounds (every slot a segment, `num_tokens` per segment),
    # and launch grids are sized by them rather than by one batch's grouping.
    bounded: bool = False
    # Launch configurations memoised by the kernel launchers for this step (they depend
    # only on the batch and the group's shapes, which repeat across layers).
    launch_cache: dict[tuple[Any, ...], Any] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def num_segments(self) -> int:
        return len(self.seg_slots_host)

    @property
    def num_slots(self) -> int:
        return int(self.slot_ranks.shape[0])


def _to_host_tensor(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.int64).reshape(-1)
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def _pad4(n: int) -> int:
    # Sections of the packed buffer start on 16-byte boundaries, so every view keeps
    # the pointer alignment Triton specialises on and step-to-step recompiles are avoided.
    return (n + 3) // 4 * 4


def build_meta(
    token_slots: Sequence[int] | torch.Tensor,
    slot_ranks: Sequence[int] | torch.Tensor,
    device: torch.device | str,
) -> LoraKernelMeta:
    """Group the tokens of one step by adapter slot.

    `token_slots[t]` is token t's slot in `[0, S)` or -1; `slot_ranks` has one entry per
    slot of the pool (`S = len(slot_ranks)`), each in `[0, r_max]`. Pass host data (a
    list or CPU tensor): a device tensor works but costs a synchronising copy. All the
    device tensors are carved out of one buffer sent with a single host→device copy.
    Raises ValueError on a slot outside `[-1, S)` or a negative rank.
    """
    slots = _to_host_tensor(token_slots)  # [T] int64, host
    ranks = _to_host_tensor(slot_ranks)  # [S] int64, host
    num_slots = int(ranks.shape[0])
    if bool((ranks < 0).any()):
        raise ValueError(f"slot ranks must be non-negative, got {ranks.tolist()}")
    bad = slots[(slots < NO_SLOT) | (slots >= num_slots)]
    if bad.numel():
        raise ValueError(
            f"token slot {int(bad[0])} is out of range: expected -1 or a slot in [0, {num_slots})"
        )

    # A stable sort keeps the tokens of a segment in batch order; -1 sorts last.
    key = torch.where(slots < 0, num_slots, slots)
    order = torch.sort(key, stable=True).indices
    num_active = int((slots >= 0).sum())
    seg_slots_t, seg_lens_t = torch.unique_consecutive(key[order][:num_active], return_counts=True)
    seg_slots = seg_slots_t.tolist()
    seg_lens = seg_lens_t.tolist()
    seg_starts = [0, *torch.cumsum(seg_lens_t, 0).tolist()]
    seg_ranks = [int(ranks[s]) for s in seg_slots]

    num_tokens = int(slots.shape[0])
    sections = (slots, order, torch.tensor(seg_starts), seg_slots_t, ranks)
    packed = torch.zeros(sum(_pad4(v.numel()) for v in sections), dtype=torch.int32)
    views: list[tuple[int, int]] = []
    pos = 0
    for values in sections:
        packed[pos : pos + values.numel()] = values
        views.append((pos, values.numel()))
        pos += _pad4(values.numel())
    on_device = to_device(packed, device, torch.int32)
    tensors = [on_device[a : a + n] for a, n in views]

    return LoraKernelMeta(
        token_slots=tensors[0],
        sorted_token_ids=tensors[1],
        seg_starts=tensors[2],
        seg_slots=tensors[3],
        slot_ranks=tensors[4],
        num_tokens=num_tokens,
        num_active=num_active,
        max_seg_len=max(seg_lens, default=0),
        max_rank=max(seg_ranks, default=0),
        seg_starts_host=tuple(seg_starts),
        seg_slots_host=tuple(seg_slots),
        seg_ranks_host=tuple(seg_ranks),
    )
