"""What attention needs to know about one flat batch: where each sequence's tokens sit,
how long each context is, and which cache blocks hold it.

A flat batch concatenates the new tokens of many sequences (prefill chunks and single
decode tokens, in any order); sequence `s` owns tokens `query_start_loc[s]:query_start_loc[s+1]`.
Its new tokens are the last `q_len` of its `context_len` tokens, so new token `i` sits at
position `context_len - q_len + i` and attends to positions `0..that` (causal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain

import torch
from torch import Tensor

from engine.host_copy import to_device


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    """One step's attention layout; build it with `AttentionMetadata.build`.

    Python-int fields drive host-side loops without device syncs; tensor fields live on
    the model's device and are computed once per step, not per layer. The `decode_*`
    properties serve only the torch reference and are made on first use.
    """

    block_size: int
    query_start_loc: tuple[int, ...]  # num_seqs + 1 token offsets into the flat batch
    context_lens: tuple[int, ...]  # tokens in cache per sequence after this step
    max_context_len: int
    max_query_len: int
    prefill_seqs: tuple[int, ...]  # sequences with more than one new token
    decode_seqs: tuple[int, ...]  # sequences with exactly one new token
    slot_mapping: Tensor  # [T] long: cache slot of each new token's k/v
    positions: Tensor  # [T] long: absolute position of each new token
    block_tables: Tensor  # [num_seqs, max_blocks] int32, padded with 0
    context_lens_tensor: Tensor  # [num_seqs] int32
    query_start_loc_tensor: Tensor  # [num_seqs + 1] int32 (flash-attn cu_seqlens_q)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @cached_property
    def _decode_seq_index(self) -> Tensor:  # [num_decode] long
        return to_device(self.decode_seqs, self.slot_mapping.device)

    @cached_property
    def decode_token_index(self) -> Tensor:  # [num_decode] long: flat index of the token
        return self.query_start_loc_tensor.index_select(0, self._decode_seq_index).long()

    @cached_property
    def decode_context_lens(self) -> Tensor:  # [num_decode] int32
        return self.context_lens_tensor.index_select(0, self._decode_seq_index)

    @cached_property
    def decode_block_tables(self) -> Tensor:  # [num_decode, num_decode_blocks] long
        # Only as many blocks as the longest decode context needs, not max_blocks.
        longest = max((self.context_lens[s] for s in self.decode_seqs), default=0)
        width = -(-longest // self.block_size)
        rows = self.block_tables.index_select(0, self._decode_seq_index)
        return rows[:, :width].long()

    @cached_property
    def decode_key_mask(self) -> Tensor:  # [num_decode, 1, 1, num_decode_blocks*bs] bool
        num_decode, width = self.decode_block_tables.shape
        keys = torch.arange(width * self.block_size, device=self.slot_mapping.device)
        mask = keys[None, :] < self.decode_context_lens[:, None]
        return mask.view(num_decode, 1, 1, -1)

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Lay out a step from plain lists, one entry per sequence in flat-batch order.

        `query_lens[s]` new tokens of sequence `s` are in this batch; `context_lens[s]`
        counts its cached tokens after the step (prefix + new); `block_tables[s]` lists
        its blocks in order and must cover `context_lens[s]` tokens. Raises ValueError if
        the three lists disagree.

        Costs a few CPU tensor ops (no Python loop over tokens) and two host->device
        copies, asynchronous from pinned memory on CUDA.
        """
        num_seqs = len(query_lens)
        if len(context_lens) != num_seqs or len(block_tables) != num_seqs:
            raise ValueError(
                "query_lens, context_lens and block_tables need one entry per sequence"
            )
        if num_seqs == 0:
            raise ValueError("a batch needs at least one sequence")
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        ctx = torch.tensor(context_lens, dtype=torch.long)
        table_lens = torch.tensor([len(t) for t in block_tables], dtype=torch.long)
        _check(q_lens, ctx, table_lens, block_size)

        device = torch.device(device)
        pin = device.type == "cuda"
        num_tokens = int(q_lens.sum())
        max_blocks = int(table_lens.max())
        # Staging buffers, one per dtype, each copied to the device in one go:
        # longs = [slot_mapping | positions], ints = [query_start_loc | context_lens | tables].
        longs = torch.empty(2, num_tokens, dtype=torch.long, pin_memory=pin)
        num_ints = 2 * num_seqs + 1 + num_seqs * max_blocks
        ints = torch.zeros(num_ints, dtype=torch.int32, pin_memory=pin)
        qsl = ints[: num_seqs + 1]
        qsl[1:] = torch.cumsum(q_lens, 0)
        ints[num_seqs + 1 : 2 * num_seqs + 1] = ctx
        tables = ints[2 * num_seqs + 1 :].view(num_seqs, max_blocks)
        filled = torch.arange(max_blocks)[None, :] < table_lens[:, None]
        tables[filled] = torch.tensor(list(chain.from_iterable(block_tables)), dtype=torch.int32)

        seq_of_token = torch.repeat_interleave(
            torch.arange(num_seqs), q_lens, output_size=num_tokens
        )  # [T] long
        # Token i of sequence s sits at ctx[s] - q_len[s] + (i - qsl[s]).
        first_pos = ctx - q_lens - qsl[:-1].long()
        positions = longs[1]
        torch.add(torch.arange(num_tokens), first_pos[seq_of_token], out=positions)
        blocks = tables[seq_of_token, positions // block_size].long()
        torch.add(blocks * block_size, positions % block_size, out=longs[0])

        host_qsl = qsl.tolist()
        if device.type != "cpu":
            longs = to_device(longs, device, torch.long)
            ints = to_device(ints, device, torch.int32)
        return cls(
            block_size=block_size,
            query_start_loc=tuple(host_qsl),
            context_lens=tuple(context_lens),
            max_context_len=max(context_lens),
            max_query_len=max(query_lens),
            prefill_seqs=tuple((q_lens > 1).nonzero().flatten().tolist()),
            decode_seqs=tuple((q_lens == 1).nonzero().flatten().tolist()),
            slot_mapping=longs[0],
            positions=longs[1],
            block_tables=ints[2 * num_seqs + 1 :].view(num_seqs, max_blocks),
            context_lens_tensor=ints[num_seqs + 1 : 2 * num_seqs + 1],
            query_start_loc_tensor=ints[: num_seqs + 1],
        )

    @classmethod
    def for_decode_graph(
        cls,
        block_size: int,
        slot_mapping: Tensor,  # [B] long
        positions: Tensor,  # [B] long
        block_tables: Tensor,  # [B, max_blocks_per_seq] int32
        context_lens: Tensor,  # [B] int32
        max_context_len: int,
    ) -> AttentionMetadata:
        """A decode-only layout over static device buffers, for a captured CUDA graph.

        Sequence b owns token b. The tensors are the caller's buffers, refilled before
        every replay; the host fields hold only what is true of every replay (the
        layout) or a bound (`max_context_len`), and `context_lens` is a placeholder.
        Only backends that read decode lengths and tables from device memory may run
        on it (`engine.attention.backend.supports_decode_graphs`).
        """
        num_seqs = int(slot_mapping.shape[0])
        device = slot_mapping.device
        return cls(
            block_size=block_size,
            query_start_loc=tuple(range(num_seqs + 1)),
            context_lens=(max_context_len,) * num_seqs,
            max_context_len=max_context_len,
            max_query_len=1,
            prefill_seqs=(),
            decode_seqs=tuple(range(num_seqs)),
            slot_mapping=slot_mapping,
            positions=positions,
            block_tables=block_tables,
            context_lens_tensor=context_lens,
            query_start_loc_tensor=torch.arange(num_seqs + 1, dtype=torch.int32, device=device),
        )

    @classmethod
    def for_mixed_graph(
        cls,
        block_size: int,
        slot_mapping: Tensor,  # [T] long
        positions: Tensor,  # [T] long
        block_tables: Tensor,  # [S, max_blocks_per_seq] int32
        context_lens: Tensor,  # [S] int32
        query_start_loc: Tensor,  # [S + 1] int32
        max_context_len: int,
    ) -> AttentionMetadata:
        """A varlen layout of up to S sequences over T token rows in static device
        buffers, for a captured CUDA graph of mixed steps (`engine.mixed_graph_inputs`
        fills them: padding sequences have no tokens, padding tokens no sequence).

        Only what attention reads from device memory is real; the host fields are
        placeholders that say "a step with prefill" so that a backend takes its varlen
        path (`engine.attention.backend.supports_decode_graphs` backends only).
        """
        num_seqs = int(context_lens.shape[0])
        return cls(
            block_size=block_size,
            query_start_loc=(0,) * num_seqs + (int(slot_mapping.shape[0]),),
            context_lens=(max_context_len,) * num_seqs,
            max_context_len=max_context_len,
            max_query_len=int(slot_mapping.shape[0]),
            prefill_seqs=tuple(range(num_seqs)),
            decode_seqs=(),
            slot_mapping=slot_mapping,
            positions=positions,
            block_tables=block_tables,
            context_lens_tensor=context_lens,
            query_start_loc_tensor=query_start_loc,
        )


def _check(q_lens: Tensor, ctx: Tensor, table_lens: Tensor, block_size: int) -> None:
    """Raise ValueError naming the first sequence whose lengths do not fit."""
    bad_len = ((q_lens < 1) | (q_lens > ctx)).nonzero()
    if bad_len.numel():
        s = int(bad_len[0])
        raise ValueError(
            f"need 1 <= query_len <= context_len, got {int(q_lens[s])} and {int(ctx[s])}"
        )
    bad_table = (table_lens * block_size < ctx).nonzero()
    if bad_table.numel():
        s = int(bad_table[0])
        raise ValueError(
            f"block table of {int(table_lens[s])} blocks cannot hold {int(ctx[s])} tokens"
        )
