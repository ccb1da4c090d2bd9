"""The torch reference paged attention against dense causal attention per sequence."""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention import AttentionMetadata, attend_torch, select_backend

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 8, 4, 64


def _dense_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q `[L, H, D]` are the last L of the `[C, KVH, D]` keys; plain causal softmax attention."""
    q_len, ctx = q.shape[0], keys.shape[0]
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1)  # [C, H, D]
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("lhd,chd->hlc", q, k) * HEAD_DIM**-0.5
    allowed = torch.arange(ctx)[None, :] <= torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hlc,chd->lhd", scores.softmax(-1), v)


def _run(seqs: list[tuple[int, int]], seed: int = 0) -> None:
    """`seqs` lists (cached_prefix_len, new_tokens) per sequence; checks one batched step."""
    gen = torch.Generator().manual_seed(seed)
    order = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(order)
    kv_layer = torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    tables, full_k, full_v = [], [], []
    for prefix, new in seqs:
        ctx = prefix + new
        table = [order.pop() for _ in range(-(-ctx // BLOCK_SIZE))]
        tables.append(table)
        keys = torch.randn(ctx, KV_HEADS, HEAD_DIM, generator=gen)
        values = torch.randn(ctx, KV_HEADS, HEAD_DIM, generator=gen)
        for pos in range(prefix):  # the cached prefix, written by earlier steps
            kv_layer[:, table[pos // BLOCK_SIZE], pos % BLOCK_SIZE] = torch.stack(
                (keys[pos], values[pos])
            )
        full_k.append(keys)
        full_v.append(values)
    meta = AttentionMetadata.build(
        [new for _, new in seqs], [p + n for p, n in seqs], tables, BLOCK_SIZE
    )
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen)
    k = torch.cat([keys[p:] for keys, (p, _) in zip(full_k, seqs, strict=True)])
    v = torch.cat([values[p:] for values, (p, _) in zip(full_v, seqs, strict=True)])

    out = attend_torch(q, k, v, kv_layer, meta, HEAD_DIM**-0.5)

    for s, (prefix, new) in enumerate(seqs):
        start, end = meta.query_start_loc[s], meta.query_start_loc[s + 1]
        expected = _dense_reference(q[start:end], full_k[s], full_v[s])
        torch.testing.assert_close(out[start:end], expected, atol=1e-5, rtol=1e-5)
        for pos in range(prefix, prefix + new):  # new k/v landed in their slots
            block, offset = tables[s][pos // BLOCK_SIZE], pos % BLOCK_SIZE
            torch.testing.assert_close(kv_layer[0, block, offset], full_k[s][pos])
            torch.testing.assert_close(kv_layer[1, block, offset], full_v[s][pos])


@pytest.mark.parametrize(
    "seqs",
    [
        [(0, 7)],  # fresh prefill
        [(5, 6)],  # prefill chunk over a cached prefix
        [(9, 1)],  # single decode
        [(3, 1), (12, 1), (0, 1), (30, 1)],  # batched decode, ragged contexts
        [(10, 1), (0, 9), (4, 1), (6, 3), (21, 1)],  # everything mixed
    ],
)
def test_matches_dense_attention(seqs: list[tuple[int, int]]) -> None:
    _run(seqs)


def test_metadata_layout() -> None:
    meta = AttentionMetadata.build([3, 1], [5, 2], [[7, 2], [4]], block_size=4)
    assert meta.query_start_loc == (0, 3, 4)
    assert meta.positions.tolist() == [2, 3, 4, 1]
    assert meta.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 2 * 4 + 0, 4 * 4 + 1]
    assert meta.block_tables.tolist() == [[7, 2], [4, 0]]
    assert meta.prefill_seqs == (0,) and meta.decode_seqs == (1,)
    assert meta.decode_block_tables.tolist() == [[4]]
    assert meta.decode_key_mask.view(-1).tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    ("query_lens", "context_lens", "tables"),
    [([2], [1], [[0]]), ([1], [9], [[0, 1]]), ([1, 1], [1], [[0], [1]])],
)
def test_metadata_rejects_inconsistent_lists(query_lens, context_lens, tables) -> None:
    with pytest.raises(ValueError):
        AttentionMetadata.build(query_lens, context_lens, tables, block_size=4)


def test_select_backend_on_cpu_is_the_reference() -> None:
    assert select_backend("cpu") is attend_torch
