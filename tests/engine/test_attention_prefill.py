"""The Triton varlen flash-attention kernel and the vectorized metadata vs the references.

Without CUDA the kernel runs under the Triton interpreter (float32, small shapes, exact
ieee dots); this module sets `TRITON_INTERPRET=1` before anything imports Triton kernels,
and only without CUDA. The `gpu` tests check bf16 at Llama-3.1-8B attention shapes with
contexts past 4,096 tokens against a float32 torch reference.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.attention import AttentionMetadata, attend_torch  # noqa: E402
from tests.triton_skip import triton_skip_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK_SIZE = 16
# (cached prefix, new tokens) per sequence, in flat-batch order: fresh prefills, chunks
# over a prefix (ending mid-block and on a block edge), decode tokens, odd lengths, and
# chunks of several query tiles and key tiles.
MIXED = [(0, 37), (21, 11), (40, 1), (0, 1), (16, 48), (5, 2), (70, 9), (0, 3)]
_SKIP = triton_skip_reason("engine.attention.triton_prefill", "_varlen_paged_kernel")


def _case(
    seqs: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A random cache with shuffled block tables; q/k/v of every sequence's new tokens."""
    contexts = [p + n for p, n in seqs]
    num_blocks = sum(-(-c // BLOCK_SIZE) for c in contexts) + 7
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    tables = [[order.pop() for _ in range(-(-c // BLOCK_SIZE))] for c in contexts]
    gen = torch.Generator().manual_seed(seed)
    kv_layer = torch.randn(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=gen)
    meta = AttentionMetadata.build([n for _, n in seqs], contexts, tables, BLOCK_SIZE, DEVICE)
    tokens = meta.num_tokens
    q = torch.randn(tokens, heads, head_dim, generator=gen)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    on = {"dtype": dtype, "device": DEVICE}
    return q.to(**on), k.to(**on), v.to(**on), kv_layer.to(**on), meta


def _kernel_vs_reference(
    seqs: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    config: object = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, float32 reference output) of one flat batch; the kernel writes
    into a NaN-poisoned buffer so that a row it skips cannot pass."""
    from engine.attention.torch_ref import write_kv
    from engine.attention.triton_prefill import varlen_paged_attention

    q, k, v, kv_layer, meta = _case(seqs, heads, kv_heads, head_dim, dtype, seed)
    scale = head_dim**-0.5
    expected = attend_torch(q.float(), k.float(), v.float(), kv_layer.float(), meta, scale)
    write_kv(kv_layer, k, v, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    got = varlen_paged_attention(
        q,
        kv_layer,
        meta.block_tables,
        meta.query_start_loc_tensor,
        meta.context_lens_tensor,
        scale,
        out=out,
        config=config,
    )
    assert got is out and got.dtype == dtype
    return got, expected


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(4, 2, 32), (3, 1, 32), (2, 2, 16), (6, 2, 24)],  # GQA 2 and 3, MHA, padded head_dim
)
def test_varlen_kernel_matches_reference(heads: int, kv_heads: int, head_dim: int) -> None:
    got, expected = _kernel_vs_reference(MIXED, heads, kv_heads, head_dim, torch.float32, seed=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (64, 32)])
def test_varlen_kernel_tile_shapes(block_m: int, block_n: int) -> None:
    """Key tiles inside one cache block and spanning two; query tiles of 8 and 32 tokens."""
    from engine.attention.triton_prefill import PrefillConfig

    config = PrefillConfig(block_m, block_n, num_warps=4, num_stages=1)
    seqs = [(3, 29), (0, 1), (0, 50), (33, 17)]
    got, expected = _kernel_vs_reference(seqs, 4, 2, 16, torch.float32, seed=2, config=config)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _per_token_layout(
    query_lens: list[int], context_lens: list[int], tables: list[list[int]], block_size: int
) -> tuple[list[int], list[int]]:
    """Positions and cache slots of every new token, one token at a time."""
    positions, slots = [], []
    for q_len, ctx, table in zip(query_lens, context_lens, tables, strict=True):
        for pos in range(ctx - q_len, ctx):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    return positions, slots


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_metadata_matches_per_token_layout(device: str) -> None:
    rng = random.Random(7)
    query_lens = [rng.choice([1, 1, 2, 5, 33, 130]) for _ in range(40)]
    context_lens = [q + rng.choice([0, 0, 3, 16, 300]) for q in query_lens]
    block_size = 16
    tables = [
        rng.sample(range(1000), -(-c // block_size) + rng.choice([0, 2])) for c in context_lens
    ]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device)

    positions, slots = _per_token_layout(query_lens, context_lens, tables, block_size)
    assert meta.positions.tolist() == positions
    assert meta.slot_mapping.tolist() == slots
    assert meta.positions.device.type == meta.block_tables.device.type == device
    width = max(len(t) for t in tables)
    assert meta.block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables]
    assert meta.block_tables.dtype == meta.context_lens_tensor.dtype == torch.int32
    assert meta.context_lens_tensor.tolist() == context_lens
    starts = [sum(query_lens[:s]) for s in range(len(query_lens) + 1)]
    assert meta.query_start_loc == tuple(starts)
    assert meta.query_start_loc_tensor.tolist() == starts
    decode = [s for s, q in enumerate(query_lens) if q == 1]
    assert meta.decode_seqs == tuple(decode)
    assert meta.prefill_seqs == tuple(s for s, q in enumerate(query_lens) if q > 1)
    assert meta.max_query_len == 130 and meta.num_tokens == len(positions)

    # What only the torch reference reads: decode gather tables and key masks.
    assert meta.decode_token_index.tolist() == [starts[s] for s in decode]
    assert meta.decode_context_lens.tolist() == [context_lens[s] for s in decode]
    num_blocks = -(-max(context_lens[s] for s in decode) // block_size)
    assert meta.decode_block_tables.tolist() == [
        (tables[s] + [0] * width)[:num_blocks] for s in decode
    ]
    mask = meta.decode_key_mask.view(len(decode), -1)
    assert mask.sum(1).tolist() == [context_lens[s] for s in decode]
    assert mask.shape[1] == num_blocks * block_size


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_backend_prefill_batch_uses_one_kernel_for_all_rows() -> None:
    """The CUDA backend on a mixed batch: every row (prefill and decode) right, cache
    written exactly as the reference writes it."""
    from engine.attention.triton_backend import attend_triton

    q, k, v, kv_layer, meta = _case(MIXED, 6, 2, 32, torch.float32, seed=3)
    ref_cache = kv_layer.clone()
    expected = attend_torch(q, k, v, ref_cache, meta, 32**-0.5)
    got = attend_triton(q, k, v, kv_layer, meta, 32**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv_layer, ref_cache, atol=0, rtol=0)


def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


# Llama-3.1-8B-shaped batches: long fresh prefills, chunks over long cached contexts,
# decode tokens of long contexts, all in one launch.
LONG_BATCH = [(0, 4100), (3000, 1200), (5000, 1), (0, 1), (4096, 513), (0, 64), (7000, 77)]


@pytest.mark.gpu
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(32, 8, 128), (32, 8, 64)])
def test_varlen_kernel_bf16_long_contexts(heads: int, kv_heads: int, head_dim: int) -> None:
    _needs_cuda()
    got, expected = _kernel_vs_reference(
        LONG_BATCH, heads, kv_heads, head_dim, torch.bfloat16, seed=4
    )
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_varlen_kernel_other_dtypes_on_gpu(dtype: torch.dtype) -> None:
    _needs_cuda()
    seqs = [(0, 700), (1500, 300), (900, 1), (0, 129)]
    got, expected = _kernel_vs_reference(seqs, 32, 8, 128, dtype, seed=5)
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_backend_bf16_mixed_step() -> None:
    """`attend_triton` at 8B shapes on a mixed step, vs the float32 reference."""
    _needs_cuda()
    from engine.attention.triton_backend import attend_triton

    q, k, v, kv_layer, meta = _case(LONG_BATCH, 32, 8, 128, torch.bfloat16, seed=6)
    scale = 128**-0.5
    expected = attend_torch(q.float(), k.float(), v.float(), kv_layer.float(), meta, scale)
    got = attend_triton(q, k, v, kv_layer, meta, scale)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
