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

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    """One step's attention layout; build it with `AttentionMetadata.build`.

    Python-int fields drive host-side loops without device syncs; tensor fields live on
    the model's device and are computed once per step, not per layer.
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
    decode_token_index: Tensor  # [num_decode] long: flat index of each decode token
    decode_block_tables: Tensor  # [num_decode, num_decode_blocks] long
    decode_key_mask: Tensor  # [num_decode, 1, 1, num_decode_blocks*block_size] bool
    decode_context_lens: Tensor  # [num_decode] int32

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def query_len(self, seq: int) -> int:
        return self.query_start_loc[seq + 1] - self.query_start_loc[seq]

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
        """
        num_seqs = len(query_lens)
        if len(context_lens) != num_seqs or len(block_tables) != num_seqs:
            raise ValueError(
                "query_lens, context_lens and block_tables need one entry per sequence"
            )
        if num_seqs == 0:
            raise ValueError("a batch needs at least one sequence")
        query_start_loc = [0]
        slots: list[int] = []
        positions: list[int] = []
        for q_len, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
            if not 1 <= q_len <= ctx:
                raise ValueError(f"need 1 <= query_len <= context_len, got {q_len} and {ctx}")
            if len(table) * block_size < ctx:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {ctx} tokens")
            for pos in range(ctx - q_len, ctx):
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            query_start_loc.append(query_start_loc[-1] + q_len)

        max_blocks = max(len(t) for t in block_tables)
        padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
        decode_seqs = tuple(s for s in range(num_seqs) if query_lens[s] == 1)
        prefill_seqs = tuple(s for s in range(num_seqs) if query_lens[s] > 1)
        # Decode gathers only as many blocks as its longest context needs, not max_blocks.
        decode_ctx = [context_lens[s] for s in decode_seqs]
        num_decode_blocks = -(-max(decode_ctx) // block_size) if decode_ctx else 0
        decode_tables = [padded[s][:num_decode_blocks] for s in decode_seqs]
        key_pos = torch.arange(num_decode_blocks * block_size)
        decode_mask = key_pos[None, :] < torch.tensor(decode_ctx, dtype=torch.long)[:, None]

        def on_device(values: object, dtype: torch.dtype) -> Tensor:
            return torch.as_tensor(values, dtype=dtype).to(device)

        return cls(
            block_size=block_size,
            query_start_loc=tuple(query_start_loc),
            context_lens=tuple(context_lens),
            max_context_len=max(context_lens),
            max_query_len=max(query_lens),
            prefill_seqs=prefill_seqs,
            decode_seqs=decode_seqs,
            slot_mapping=on_device(slots, torch.long),
            positions=on_device(positions, torch.long),
            block_tables=on_device(padded, torch.int32),
            context_lens_tensor=on_device(list(context_lens), torch.int32),
            query_start_loc_tensor=on_device(query_start_loc, torch.int32),
            decode_token_index=on_device([query_start_loc[s] for s in decode_seqs], torch.long),
            decode_block_tables=on_device(decode_tables, torch.long).view(
                len(decode_seqs), num_decode_blocks
            ),
            decode_key_mask=decode_mask.view(len(decode_seqs), 1, 1, key_pos.numel()).to(device),
            decode_context_lens=on_device(decode_ctx, torch.int32),
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
        on it (`engine.attention.backend.supports_decode_graphs`): `decode_key_mask`
        is empty.
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
            decode_token_index=torch.arange(num_seqs, dtype=torch.long, device=device),
            decode_block_tables=block_tables,
            decode_key_mask=torch.empty(num_seqs, 1, 1, 0, dtype=torch.bool, device=device),
            decode_context_lens=context_lens,
        )
