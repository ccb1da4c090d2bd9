"""Host side of CUDA-graph decode: batch buckets, padding, and the static input buffers.

A captured graph replays fixed kernels on fixed addresses, so a decode step of B
sequences runs the graph of the smallest captured bucket >= B, its inputs copied into
static buffers first. Rows past B are padding: token 0 at position 0, writing its k/v
to a scratch slot (the first slot of a KV block the scheduler never hands out) and
attending to that one slot (context length 1), with no adapter (slot -1). Their
outputs are computed and ignored. Rows are also grouped into segments by adapter slot
(the slots present, ascending; then empty segments up to one per slot of the pool),
for the graphs that apply LoRA as SGMV.

Everything here is plain data and copies, so it runs (and is tested) on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from engine.host_copy import copy_into
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
    """One decode step's inputs padded to `bucket` rows (numpy arrays of `bucket` rows)."""

    bucket: int
    num_seqs: int  # real rows, first in the bucket
    longs: np.ndarray  # [3, bucket] int64: input ids, positions, cache slots
    context_lens: np.ndarray  # [bucket] int32
    block_tables: np.ndarray  # [bucket, width] int32, width = the widest table needed
    token_slots: np.ndarray  # [bucket] int32: adapter slot per row, -1 for none
    sorted_token_ids: np.ndarray  # [bucket] int32: rows grouped by adapter slot, -1 last
    seg_starts: np.ndarray  # [num_slots + 1] int32: segment g's rows in sorted_token_ids
    seg_slots: np.ndarray  # [num_slots] int32: the adapter slot of segment g


def pad_decode(
    seqs: Sequence[ScheduledSeq], bucket: int, block_size: int, pad_block: int, num_slots: int = 0
) -> PaddedDecode:
    """Lay out a decode-only step in `bucket` rows; rows past `len(seqs)` are padding
    attending to `pad_block` alone; `num_slots` is the adapter pool's slot count. Raises
    ValueError if a row is not a decode token, the batch exceeds the bucket, or a block
    table does not cover its token.

    Runs once per decode step on the engine loop, so it is numpy over whole columns,
    with Python touching each sequence once."""
    num_seqs = len(seqs)
    if num_seqs > bucket:
        raise ValueError(f"{num_seqs} sequences do not fit a bucket of {bucket}")
    bad = next((s for s in seqs if len(s.token_ids) != 1), None)
    if bad is not None:
        raise ValueError(f"request {bad.request_id} feeds {len(bad.token_ids)} tokens")
    longs = np.zeros((3, bucket), dtype=np.int64)
    ids, positions, cache_slots = longs
    ids[:num_seqs] = np.fromiter((s.token_ids[0] for s in seqs), np.int64, num_seqs)
    positions[:num_seqs] = np.fromiter((s.start_position for s in seqs), np.int64, num_seqs)
    pos = positions[:num_seqs]
    needed = pos // block_size + 1  # blocks each context needs
    table_lens = np.fromiter((len(s.block_table) for s in seqs), np.int64, num_seqs)
    if (table_lens < needed).any():
        bad = seqs[int(np.argmax(table_lens < needed))]
        raise ValueError(f"request {bad.request_id}: block table too short for its position")
    width = int(needed.max()) if num_seqs else 1
    # Only the blocks each context needs, the rest of each row the scratch block.
    tables = np.full((bucket, width), pad_block, dtype=np.int32)
    flat = np.fromiter(
        chain.from_iterable(s.block_table[: s.start_position // block_size + 1] for s in seqs),
        np.int32,
    )  # [sum(needed)]: each sequence's needed blocks, row after row
    row_starts = np.repeat(np.cumsum(needed) - needed, needed)
    tables[np.repeat(np.arange(num_seqs), needed), np.arange(len(flat)) - row_starts] = flat
    blocks = tables[np.arange(num_seqs), pos // block_size].astype(np.int64)
    cache_slots[:num_seqs] = blocks * block_size + pos % block_size
    cache_slots[num_seqs:] = pad_block * block_size
    context_lens = np.ones(bucket, dtype=np.int32)
    context_lens[:num_seqs] = pos + 1
    token_slots = np.full(bucket, NO_SLOT, dtype=np.int32)
    token_slots[:num_seqs] = np.fromiter((s.adapter_slot for s in seqs), np.int32, num_seqs)
    # As build_meta orders tokens: by slot, stable, slot -1 last (rows sharing an
    # adapter run side by side and share its weights through L2).
    key = np.where(token_slots < 0, np.iinfo(np.int32).max, token_slots)
    order = np.argsort(key, kind="stable").astype(np.int32)
    present, counts = np.unique(token_slots[token_slots >= 0], return_counts=True)
    if len(present) and present[-1] >= num_slots:
        raise ValueError(f"adapter slot {present[-1]} is outside a pool of {num_slots} slots")
    seg_starts = np.full(num_slots + 1, counts.sum(), dtype=np.int32)  # empty ones last
    seg_starts[0] = 0
    seg_starts[1 : len(counts) + 1] = np.cumsum(counts)
    seg_slots = np.zeros(num_slots, dtype=np.int32)
    seg_slots[: len(present)] = present
    return PaddedDecode(
        bucket, num_seqs, longs, context_lens, tables, token_slots, order, seg_starts, seg_slots
    )


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
        # sections: context lens, token slots, sorted token ids (rows each), then slot
        # ranks, segment starts and segment slots (one per slot of the pool, +1 starts)
        self._slots_stride = _pad16(num_lora_slots + 1)
        self.ints = torch.zeros(
            3 * self._stride + 3 * self._slots_stride, dtype=torch.int32, device=device
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
        return self._slots_section(0, self.num_lora_slots)

    @property
    def seg_starts(self) -> torch.Tensor:  # [num_lora_slots + 1] int32
        return self._slots_section(1, self.num_lora_slots + 1)

    @property
    def seg_slots(self) -> torch.Tensor:  # [num_lora_slots] int32
        return self._slots_section(2, self.num_lora_slots)

    def _slots_section(self, index: int, length: int) -> torch.Tensor:
        start = 3 * self._stride + index * self._slots_stride
        return self.ints[start : start + length]

    def tables(self, rows: int) -> torch.Tensor:  # [rows, max_blocks_per_seq] int32
        return self.block_tables[:rows]

    def fill(self, step: PaddedDecode, slot_ranks: Sequence[int] | torch.Tensor = ()) -> None:
        """Copy `step` (and the pool's current slot ranks) into the buffers.

        Rows past `step.bucket` and table columns past the step's widest table keep
        stale values: the bucket's graph never reads the former, and a sequence never
        reads table entries beyond its own context.
        """
        rows, width = step.block_tables.shape
        if rows > self.max_bucket or width > self.max_blocks_per_seq:
            raise ValueError(f"a step of {rows} rows x {width} blocks exceeds the buffers")
        ranks = np.asarray(slot_ranks, dtype=np.int32)
        num_slots = self.num_lora_slots
        if len(ranks) > num_slots or len(step.seg_starts) != num_slots + 1:
            raise ValueError(
                f"{len(ranks)} slot ranks and {len(step.seg_starts) - 1} segments "
                f"for buffers of {num_slots} slots"
            )
        copy_into(self.longs[:, :rows], step.longs)
        ints = np.zeros(self.ints.numel(), dtype=np.int32)
        s = self._stride
        ints[:rows] = step.context_lens
        ints[s : s + rows] = step.token_slots
        ints[2 * s : 2 * s + rows] = step.sorted_token_ids
        slots = ints[3 * s :].reshape(3, self._slots_stride)
        slots[0, : len(ranks)] = ranks
        slots[1, : len(step.seg_starts)] = step.seg_starts
        slots[2, :num_slots] = step.seg_slots
        copy_into(self.ints, ints)
        copy_into(self.block_tables[:rows, :width], step.block_tables)

    def fill_padding(self, pad_block: int, block_size: int) -> None:
        """Make every row a padding row (before capture: warm-up writes go to scratch)."""
        self.fill(pad_decode((), self.max_bucket, block_size, pad_block, self.num_lora_slots))
