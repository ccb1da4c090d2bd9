"""Host side of CUDA-graph decode: batch buckets, padding, and the static input buffers.

A captured graph replays fixed kernels on fixed addresses, so a decode step of B
sequences runs the graph of the smallest captured bucket >= B, its inputs copied into
static buffers first. Rows past B are padding: token 0 at position 0, writing its k/v
to a scratch slot (the first slot of a KV block the scheduler never hands out) and
attending to that one slot (context length 1), with no adapter (slot -1). Their
outputs are computed and ignored.

Everything here is plain data and copies, so it runs (and is tested) on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.kernels.meta import NO_SLOT
from engine.scheduler import ScheduledSeq


def capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """Batch buckets to capture: 1, 2, 4, 8, then every 8 up to 32, every 16 up to 128,
    every 32 beyond, always ending at `max_num_seqs` itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    sizes, size = [1, 2, 4, 8], 16
    while size < max_num_seqs:
        sizes.append(size)
        size += 8 if size < 32 else 16 if size < 128 else 32
    return tuple(sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs}))


def bucket_for(num_seqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest bucket of `sizes` holding `num_seqs` rows, None if none does."""
    fitting = [s for s in sizes if s >= num_seqs]
    return min(fitting) if fitting and num_seqs > 0 else None


def is_decode_only(seqs: Sequence[ScheduledSeq]) -> bool:
    """Every sequence feeds exactly one token and samples the next one."""
    return bool(seqs) and all(len(s.token_ids) == 1 and s.needs_logits for s in seqs)


@dataclass(frozen=True)
class PaddedDecode:
    """One decode step's inputs padded to `bucket` rows (lists of length `bucket`)."""

    bucket: int
    num_seqs: int  # real rows, first in the bucket
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]  # each row padded to the batch's widest table
    token_slots: list[int]  # adapter slot per row, -1 for none
    sorted_token_ids: list[int]  # rows grouped by adapter slot, slot -1 last

    @property
    def has_adapters(self) -> bool:
        return any(s != NO_SLOT for s in self.token_slots)


def pad_decode(
    seqs: Sequence[ScheduledSeq], bucket: int, block_size: int, pad_block: int
) -> PaddedDecode:
    """Lay out a decode-only step in `bucket` rows; rows past `len(seqs)` are padding
    attending to `pad_block` alone. Raises ValueError if a row is not a decode token,
    the batch exceeds the bucket, or a block table does not cover its token."""
    if len(seqs) > bucket:
        raise ValueError(f"{len(seqs)} sequences do not fit a bucket of {bucket}")
    ids, positions, slots, ctx, tables, adapters = [], [], [], [], [], []
    for seq in seqs:
        if len(seq.token_ids) != 1:
            raise ValueError(f"request {seq.request_id} feeds {len(seq.token_ids)} tokens")
        pos = seq.start_position
        num_blocks = pos // block_size + 1
        if len(seq.block_table) < num_blocks:
            raise ValueError(f"request {seq.request_id}: block table too short for {pos}")
        ids.append(seq.token_ids[0])
        positions.append(pos)
        slots.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
        ctx.append(pos + 1)
        tables.append(list(seq.block_table[:num_blocks]))
        adapters.append(seq.adapter_slot)
    num_pad = bucket - len(seqs)
    ids += [0] * num_pad
    positions += [0] * num_pad
    slots += [pad_block * block_size] * num_pad
    ctx += [1] * num_pad
    tables += [[pad_block] for _ in range(num_pad)]
    adapters += [NO_SLOT] * num_pad
    width = max(len(t) for t in tables)
    tables = [t + [pad_block] * (width - len(t)) for t in tables]
    # As build_meta orders tokens: by slot, stable, slot -1 last (rows sharing an
    # adapter run side by side and share its weights through L2).
    order = sorted(range(bucket), key=lambda r: (adapters[r] < 0, adapters[r]))
    return PaddedDecode(bucket, len(seqs), ids, positions, slots, ctx, tables, adapters, order)


def _pad16(n: int) -> int:
    # Sections start on 64-byte boundaries: kernels see the alignment they specialise on.
    return (n + 15) // 16 * 16


class StaticDecodeBuffers:
    """The fixed device tensors a captured decode graph reads, refilled every step.

    Views for a bucket of b rows are prefixes (`input_ids(b)`, ...), so every bucket's
    graph reads the same memory. `fill` writes a whole step with three copies.
    """

    def __init__(
        self, max_bucket: int, max_blocks_per_seq: int, num_lora_slots: int, device: torch.device
    ) -> None:
        self.max_bucket = max_bucket
        self.max_blocks_per_seq = max_blocks_per_seq
        self.num_lora_slots = num_lora_slots
        self._stride = _pad16(max_bucket)
        # rows: input ids, positions, cache slots
        self.longs = torch.zeros(3, self._stride, dtype=torch.long, device=device)
        # sections: context lens, token slots, sorted token ids, slot ranks
        self.ints = torch.zeros(
            3 * self._stride + _pad16(max(num_lora_slots, 1)), dtype=torch.int32, device=device
        )
        self.block_tables = torch.zeros(
            max_bucket, max_blocks_per_seq, dtype=torch.int32, device=device
        )  # [max_bucket, max_blocks_per_seq]

    def input_ids(self, rows: int) -> torch.Tensor:  # [rows] long
        return self.longs[0, :rows]

    def positions(self, rows: int) -> torch.Tensor:  # [rows] long
        return self.longs[1, :rows]

    def slot_mapping(self, rows: int) -> torch.Tensor:  # [rows] long
        return self.longs[2, :rows]

    def context_lens(self, rows: int) -> torch.Tensor:  # [rows] int32
        return self.ints[:rows]

    def token_slots(self, rows: int) -> torch.Tensor:  # [rows] int32
        return self.ints[self._stride : self._stride + rows]

    def sorted_token_ids(self, rows: int) -> torch.Tensor:  # [rows] int32
        return self.ints[2 * self._stride : 2 * self._stride + rows]

    @property
    def slot_ranks(self) -> torch.Tensor:  # [num_lora_slots] int32
        return self.ints[3 * self._stride : 3 * self._stride + self.num_lora_slots]

    def tables(self, rows: int) -> torch.Tensor:  # [rows, max_blocks_per_seq] int32
        return self.block_tables[:rows]

    def fill(self, step: PaddedDecode, slot_ranks: Sequence[int] | torch.Tensor = ()) -> None:
        """Copy `step` (and the pool's current slot ranks) into the buffers.

        Rows past `step.bucket` and table columns past the step's widest table keep
        stale values: the bucket's graph never reads the former, and a sequence never
        reads table entries beyond its own context.
        """
        rows, width = step.bucket, len(step.block_tables[0])
        if rows > self.max_bucket or width > self.max_blocks_per_seq:
            raise ValueError(f"a step of {rows} rows x {width} blocks exceeds the buffers")
        ranks = [int(r) for r in slot_ranks]
        if len(ranks) > self.num_lora_slots:
            raise ValueError(f"{len(ranks)} slot ranks for {self.num_lora_slots} slots")
        # numpy builds tensors from nested lists several times faster than torch.tensor
        longs = np.array([step.input_ids, step.positions, step.slot_mapping], dtype=np.int64)
        self.longs[:, :rows].copy_(torch.from_numpy(longs))
        ints = [0] * self.ints.numel()
        s = self._stride
        ints[:rows] = step.context_lens
        ints[s : s + rows] = step.token_slots
        ints[2 * s : 2 * s + rows] = step.sorted_token_ids
        ints[3 * s : 3 * s + len(ranks)] = ranks
        self.ints.copy_(torch.tensor(ints, dtype=torch.int32))
        tables = np.array(step.block_tables, dtype=np.int32)
        self.block_tables[:rows, :width].copy_(torch.from_numpy(tables))

    def fill_padding(self, pad_block: int, block_size: int) -> None:
        """Make every row a padding row (before capture: warm-up writes go to scratch)."""
        self.fill(pad_decode((), self.max_bucket, block_size, pad_block))
