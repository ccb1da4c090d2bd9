"""The Triton paged-decode kernel and the CUDA attention backend vs the torch reference.

Without CUDA the kernels run under the Triton interpreter (float32, small shapes);
Triton decides between compiling and interpreting when a kernel is defined, so this
module sets `TRITON_INTERPRET=1` before anything imports them, and only without CUDA.
The `gpu` test checks bf16 at Llama-3.1-8B attention shapes.
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
CONTEXTS = [1, 15, 16, 17, 70]


_SKIP = triton_skip_reason("engine.attention.triton_decode", "_paged_decode_kernel")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _cache_and_tables(
    contexts: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, list[list[int]]]:
    """A random cache and shuffled, non-contiguous block tables covering `contexts`."""
    num_blocks = sum(-(-c // BLOCK_SIZE) for c in contexts) + 7
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    tables = [[order.pop() for _ in range(-(-c // BLOCK_SIZE))] for c in contexts]
    gen = torch.Generator().manual_seed(seed)
    kv_layer = torch.randn(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=gen)
    return kv_layer.to(dtype=dtype, device=DEVICE), tables


def _decode_case(
    contexts: list[int], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    kv_layer, tables = _cache_and_tables(contexts, kv_heads, head_dim, dtype, seed)
    meta = AttentionMetadata.build([1] * len(contexts), contexts, tables, BLOCK_SIZE, DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(contexts), heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    # The new token's k/v: the backends write them at slot_mapping before attending.
    k = torch.randn(len(contexts), kv_heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    v = torch.randn(len(contexts), kv_heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    return q, k, v, kv_layer, meta


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_matches_reference(head_dim: int, group: int, num_splits: int) -> None:
    from engine.attention.torch_ref import write_kv
    from engine.attention.triton_decode import paged_decode_attention

    kv_heads = 2
    q, k, v, kv_layer, meta = _decode_case(
        CONTEXTS, kv_heads * group, kv_heads, head_dim, torch.float32, seed=head_dim + group
    )
    scale = head_dim**-0.5
    expected = attend_torch(q, k, v, kv_layer.clone(), meta, scale)
    write_kv(kv_layer, k, v, meta.slot_mapping)
    got = paged_decode_attention(
        q, kv_layer, meta.block_tables, meta.context_lens_tensor, scale, max(CONTEXTS), num_splits
    )
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_backend_mixed_batch_matches_reference() -> None:
    """Prefill chunks (fresh and over a prefix) and decode tokens in one flat batch."""
    from engine.attention.triton_backend import attend_triton

    heads, kv_heads, head_dim = 6, 2, 32
    # (cached prefix, new tokens) per sequence, in flat-batch order.
    seqs = [(16, 1), (0, 9), (3, 1), (20, 5), (69, 1), (0, 1)]
    contexts = [p + n for p, n in seqs]
    kv_layer, tables = _cache_and_tables(contexts, kv_heads, head_dim, torch.float32, seed=5)
    meta = AttentionMetadata.build([n for _, n in seqs], contexts, tables, BLOCK_SIZE, DEVICE)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(meta.num_tokens, heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(meta.num_tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(meta.num_tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    ref_cache = kv_layer.clone()
    expected = attend_torch(q, k, v, ref_cache, meta, head_dim**-0.5)
    got = attend_triton(q, k, v, kv_layer, meta, head_dim**-0.5)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kv_layer, ref_cache, atol=0, rtol=0)


def test_backend_on_graph_metadata_with_padding_rows() -> None:
    """Static-buffer metadata (`for_decode_graph`) with two padding rows that attend to
    one slot of a scratch block gives the real rows the reference's answers."""
    from engine.attention.triton_backend import attend_triton

    heads, kv_heads, head_dim = 4, 2, 32
    q, k, v, kv_layer, meta = _decode_case(CONTEXTS, heads, kv_heads, head_dim, torch.float32, 9)
    scale = head_dim**-0.5
    expected = attend_torch(q, k, v, kv_layer.clone(), meta, scale)

    num_real, bucket, max_blocks = len(CONTEXTS), len(CONTEXTS) + 2, 8
    scratch = kv_layer.shape[1] - 1  # the tables above never use the last 7 blocks
    tables = torch.full((bucket, max_blocks), 12345, dtype=torch.int32)  # stale garbage
    tables[:num_real, : meta.block_tables.shape[1]] = meta.block_tables.cpu()
    tables[num_real:, 0] = scratch
    graph_meta = AttentionMetadata.for_decode_graph(
        BLOCK_SIZE,
        slot_mapping=torch.cat(
            [meta.slot_mapping.cpu(), torch.full((2,), scratch * BLOCK_SIZE)]
        ).to(DEVICE),
        positions=torch.cat([meta.positions.cpu(), torch.zeros(2, dtype=torch.long)]).to(DEVICE),
        block_tables=tables.to(DEVICE),
        context_lens=torch.tensor([*CONTEXTS, 1, 1], dtype=torch.int32, device=DEVICE),
        max_context_len=max_blocks * BLOCK_SIZE,
    )
    pad = torch.zeros(2, heads, head_dim, device=DEVICE)
    pad_kv = torch.zeros(2, kv_heads, head_dim, device=DEVICE)
    got = attend_triton(
        torch.cat([q, pad]),
        torch.cat([k, pad_kv]),
        torch.cat([v, pad_kv]),
        kv_layer,
        graph_meta,
        scale,
    )
    torch.testing.assert_close(got[:num_real], expected, atol=2e-5, rtol=2e-5)
    assert torch.isfinite(got[num_real:]).all()


def test_graph_metadata_layout() -> None:
    slots = torch.tensor([5, 9, 33])
    tables = torch.zeros(3, 4, dtype=torch.int32)
    ctx = torch.tensor([3, 1, 2], dtype=torch.int32)
    meta = AttentionMetadata.for_decode_graph(16, slots, slots, tables, ctx, 64)
    assert meta.num_seqs == meta.num_tokens == 3
    assert meta.prefill_seqs == () and meta.decode_seqs == (0, 1, 2)
    assert meta.slot_mapping is slots and meta.context_lens_tensor is ctx
    assert meta.block_tables is tables and meta.max_context_len == 64


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_paged_decode_bf16_llama8b_shapes(num_splits: int | None) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from engine.attention.torch_ref import write_kv
    from engine.attention.triton_decode import paged_decode_attention

    gen = torch.Generator().manual_seed(0)
    contexts = torch.randint(512, 2049, (32,), generator=gen).tolist()
    contexts[0], contexts[1] = 1, 17  # and two short ones among them
    q, k, v, kv_layer, meta = _decode_case(contexts, 32, 8, 128, torch.bfloat16, seed=3)
    scale = 128**-0.5
    expected = attend_torch(
        q.float(), k.float(), v.float(), kv_layer.float(), meta, scale
    )  # float32 reference
    write_kv(kv_layer, k, v, meta.slot_mapping)
    got = paged_decode_attention(
        q, kv_layer, meta.block_tables, meta.context_lens_tensor, scale, max(contexts), num_splits
    )
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_backend_choice() -> None:
    from engine.attention import select_backend, supports_decode_graphs
    from engine.attention.triton_backend import attend_triton

    assert select_backend("cuda") is attend_triton
    assert select_backend("cpu") is attend_torch
    assert supports_decode_graphs(attend_triton) and not supports_decode_graphs(attend_torch)
