"""Host side of CUDA-graph mixed steps: token buckets, padding, the static input buffers.

A mixed step (prefill chunks, maybe beside decode tokens) of T tokens over n sequences
runs the graph of the smallest captured token bucket >= T. A bucket of `b` tokens is
laid out for `min(b, max_num_seqs)` sequences (every sequence feeds at least one token):
- tokens past T are padding: token 0 at position 0, writing its k/v to the scratch
  slot of a KV block the scheduler never hands out, in no sequence (attention never
  writes their rows) and with no adapter; their outputs are computed and ignored;
- sequences past n are padding with no tokens (`query_start_loc` stays at T), so every
  attention program of theirs exits at once;
- every LoRA slot is a segment (empty ones have no tokens), so the SGMV grid is sized
  by a bound and the real grouping lives in device memory (`LoraKernelMeta.bounded`);
- logits are taken for `min(b, max_num_seqs)` rows: the sampling rows first, then row 0
  again as padding.

Everything here is numpy and copies, so it runs (and is tested) on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata
from engine.host_copy import copy_into
from engine.kernels.meta import LoraKernelMeta
from engine.scheduler import ScheduledSeq


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """Token buckets to capture: 16, 32, 64, 128, then every 128 up to 512 and every
    256 beyond, always ending at `max_tokens` itself (padding wastes at most ~33 %)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    sizes, size = [16, 32, 64, 128], 256
    while size < max_tokens:
        sizes.append(size)
        size += 128 if size < 512 else 256
    return tuple(sorted({s for s in sizes if s < max_tokens} | {max_tokens}))


def seqs_in_bucket(bucket: int, max_num_seqs: int) -> int:
    """Sequences a `bucket`-token layout has room for."""
    return min(bucket, max_num_seqs)


@dataclass(frozen=True)
class MixedLayout:
    """One step's inputs padded to a bucket: numpy arrays ready to copy."""

    bucket: int
    num_tokens: int  # real tokens, first in the bucket
    num_sampled: int  # logits rows that sample, first in `logits_indices`
    longs: np.ndarray  # [4, bucket] int64: input ids, positions, cache slots, logits rows
    query_start_loc: np.ndarray  # [max_num_seqs + 1] int32, T from the last sequence on
    context_lens: np.ndarray  # [num_seqs] int32 (real sequences only)
    block_tables: np.ndarray  # [num_seqs, width] int32 (real sequences only)
    sorted_token_ids: np.ndarray  # [bucket] int32: tokens by adapter slot, no slot last
    seg_starts: np.ndarray  # [num_slots + 1] int32: slot s owns sorted ids seg_starts[s:s+2]


def lay_out_mixed(
    seqs: Sequence[ScheduledSeq],
    bucket: int,
    *,
    max_num_seqs: int,
    block_size: int,
    pad_block: int,
    num_slots: int,
) -> MixedLayout:
    """Lay out a step of `seqs` (flat-batch order) in a `bucket`-token layout. Raises
    ValueError if it does not fit: too many tokens or sequences, a sequence with no
    tokens, or a block table that does not cover its context."""
    num_seqs = len(seqs)
    q_lens = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=num_seqs)
    num_tokens = int(q_lens.sum())
    if not seqs or num_tokens > bucket or num_seqs > seqs_in_bucket(bucket, max_num_seqs):
        raise ValueError(f"{num_seqs} sequences of {num_tokens} tokens do not fit {bucket}")
    if (q_lens < 1).any():
        raise ValueError("every sequence of a step feeds at least one token")
    starts = np.fromiter((s.start_position for s in seqs), dtype=np.int64, count=num_seqs)
    context_lens = starts + q_lens
    table_lens = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=num_seqs)
    if (table_lens * block_size < context_lens).any():
        raise ValueError("a block table does not cover its sequence's context")

    width = int(table_lens.max())
    tables = np.zeros((num_seqs, width), dtype=np.int32)
    filled = np.arange(width)[None, :] < table_lens[:, None]
    tables[filled] = np.fromiter(chain.from_iterable(s.block_table for s in seqs), np.int32)
    qsl = np.full(max_num_seqs + 1, num_tokens, dtype=np.int32)
    qsl[0] = 0
    qsl[1 : num_seqs + 1] = np.cumsum(q_lens)

    longs = np.zeros((4, bucket), dtype=np.int64)
    ids, positions, cache_slots, logits_rows = longs
    ids[:num_tokens] = np.fromiter(chain.from_iterable(s.token_ids for s in seqs), np.int64)
    seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
    positions[:num_tokens] = (
        np.arange(num_tokens) - qsl[seq_of_token] + starts[seq_of_token]
    )  # token i of sequence s sits at start[s] + (i - qsl[s])
    pos = positions[:num_tokens]
    blocks = tables[seq_of_token, pos // block_size].astype(np.int64)
    cache_slots[:num_tokens] = blocks * block_size + pos % block_size
    cache_slots[num_tokens:] = pad_block * block_size
    sampling = np.fromiter((s.needs_logits for s in seqs), dtype=bool, count=num_seqs)
    last_tokens = qsl[1 : num_seqs + 1][sampling] - 1
    logits_rows[: len(last_tokens)] = last_tokens

    # As build_meta groups tokens: by slot, stable, no slot (and padding) last.
    adapters = np.fromiter((s.adapter_slot for s in seqs), dtype=np.int64, count=num_seqs)
    key = np.full(bucket, num_slots, dtype=np.int64)
    key[:num_tokens] = np.where(adapters < 0, num_slots, adapters)[seq_of_token]
    order = np.argsort(key, kind="stable")
    seg_starts = np.searchsorted(key[order], np.arange(num_slots + 1), side="left")
    return MixedLayout(
        bucket=bucket,
        num_tokens=num_tokens,
        num_sampled=len(last_tokens),
        longs=longs,
        query_start_loc=qsl,
        context_lens=context_lens.astype(np.int32),
        block_tables=tables,
        sorted_token_ids=order.astype(np.int32),
        seg_starts=seg_starts.astype(np.int32),
    )


def _pad16(n: int) -> int:
    # Sections start on 64-byte boundaries: kernels see the alignment they specialise on.
    return (n + 15) // 16 * 16


class StaticMixedBuffers:
    """The fixed device tensors every mixed-step graph reads, refilled every step.

    A bucket's views are prefixes, so all graphs read the same memory. `fill` writes a
    step with three copies; `attention_metadata` and `lora_meta` describe a bucket over
    the buffers for the capture.
    """

    def __init__(
        self,
        max_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        num_lora_slots: int,
        device: torch.device,
    ) -> None:
        self.max_tokens = max_tokens
        self.max_num_seqs = max_num_seqs
        self.num_lora_slots = num_lora_slots
        t, s, n = _pad16(max_tokens), _pad16(max_num_seqs + 1), _pad16(num_lora_slots + 1)
        self._sections = (0, s, 2 * s, 2 * s + t, 2 * s + t + n, 2 * s + t + 2 * n)
        # rows: input ids, positions, cache slots, logits rows
        self.longs = torch.zeros(4, t, dtype=torch.long, device=device)
        # sections: query_start_loc | context lens | sorted token ids | seg starts |
        # seg slots (always 0..S-1) | slot ranks
        self.ints = torch.zeros(2 * s + t + 3 * n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(
            max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device
        )  # [max_num_seqs, max_blocks_per_seq]
        self._section(4, num_lora_slots).copy_(torch.arange(num_lora_slots))

    def _section(self, index: int, length: int) -> torch.Tensor:
        start = self._sections[index]
        return self.ints[start : start + length]

    def input_ids(self, bucket: int) -> torch.Tensor:  # [bucket] long
        return self.longs[0, :bucket]

    def positions(self, bucket: int) -> torch.Tensor:  # [bucket] long
        return self.longs[1, :bucket]

    def logits_indices(self, bucket: int) -> torch.Tensor:  # [rows] long
        return self.longs[3, : seqs_in_bucket(bucket, self.max_num_seqs)]

    def attention_metadata(
        self, bucket: int, block_size: int, max_context_len: int
    ) -> AttentionMetadata:
        """The layout of a `bucket`-token step over the buffers (host fields are
        placeholders, as for decode graphs: see `AttentionMetadata.for_mixed_graph`)."""
        num_seqs = seqs_in_bucket(bucket, self.max_num_seqs)
        return AttentionMetadata.for_mixed_graph(
            block_size,
            slot_mapping=self.longs[2, :bucket],
            positions=self.positions(bucket),
            block_tables=self.block_tables[:num_seqs],
            context_lens=self._section(1, num_seqs),
            query_start_loc=self._section(0, num_seqs + 1),
            max_context_len=max_context_len,
        )

    def lora_meta(self, bucket: int, max_rank: int) -> LoraKernelMeta:
        """SGMV metadata of a `bucket`-token step over the buffers, sized by bounds."""
        slots = self.num_lora_slots
        sorted_ids = self._section(2, bucket)
        return LoraKernelMeta(
            token_slots=sorted_ids,  # SGMV reads only the grouping, never token_slots
            sorted_token_ids=sorted_ids,
            seg_starts=self._section(3, slots + 1),
            seg_slots=self._section(4, slots),
            slot_ranks=self._section(5, slots),
            num_tokens=bucket,
            num_active=bucket,
            max_seg_len=bucket,
            max_rank=max_rank,
            seg_starts_host=(0,) * (slots + 1),
            seg_slots_host=tuple(range(slots)),
            seg_ranks_host=(max_rank,) * slots,
            bounded=True,
        )

    def fill(self, layout: MixedLayout, slot_ranks: Sequence[int] | torch.Tensor = ()) -> None:
        """Copy `layout` (and the pool's current slot ranks) into the buffers. Rows past
        the layout's bucket and table entries past a sequence's context keep stale
        values: the bucket's graph never reads them."""
        ranks = np.asarray(slot_ranks, dtype=np.int32)
        if layout.bucket > self.max_tokens or len(ranks) > self.num_lora_slots:
            raise ValueError(f"a step of {layout.bucket} tokens exceeds the buffers")
        num_seqs, width = layout.block_tables.shape
        if width > self.block_tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks exceeds the buffers")
        copy_into(self.longs[:, : layout.bucket], layout.longs)
        ints = np.zeros(self.ints.numel(), dtype=np.int32)
        s = self._sections
        ints[s[0] : s[0] + self.max_num_seqs + 1] = layout.query_start_loc
        ints[s[1] : s[1] + num_seqs] = layout.context_lens
        ints[s[2] : s[2] + layout.bucket] = layout.sorted_token_ids
        ints[s[3] : s[3] + self.num_lora_slots + 1] = layout.seg_starts
        ints[s[4] : s[4] + self.num_lora_slots] = np.arange(self.num_lora_slots)
        ints[s[5] : s[5] + len(ranks)] = ranks
        copy_into(self.ints, ints)
        copy_into(self.block_tables[:num_seqs, :width], layout.block_tables)
