"""CUDA-graph mixed steps, the parts that need no CUDA: token buckets, the padded layout
against the eager step's own metadata, and the graph's forward run eagerly on the CPU
(static buffers, bounded SGMV over every slot, padding tokens and sequences, Triton
kernels interpreted) against the eager runner. `test_cuda_graphs_gpu.py` captures and
replays for real.
"""

from __future__ import annotations

import dataclasses
import os
import random
from itertools import pairwise

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.attention.metadata import AttentionMetadata  # noqa: E402
from engine.kernels.meta import build_meta  # noqa: E402
from engine.mixed_graph_inputs import (  # noqa: E402
    StaticMixedBuffers,
    lay_out_mixed,
    token_buckets,
)
from engine.scheduler import ScheduledSeq  # noqa: E402
from tests.triton_skip import triton_skip_reason  # noqa: E402


def test_token_buckets() -> None:
    assert token_buckets(2304)[:8] == (16, 32, 64, 128, 256, 384, 512, 768)
    assert token_buckets(2304)[-3:] == (1792, 2048, 2304)
    assert token_buckets(100) == (16, 32, 64, 100)
    assert token_buckets(16) == (16,)
    for sizes in (token_buckets(n) for n in (1, 300, 5000)):
        assert list(sizes) == sorted(set(sizes))
        # Past 128 tokens, at most a third of a bucket is padding.
        assert all(b <= a * 2 if a < 256 else b <= a * 1.5 for a, b in pairwise(sizes))
    with pytest.raises(ValueError):
        token_buckets(0)


def _random_step(rng: random.Random, num_slots: int) -> list[ScheduledSeq]:
    seqs, next_block = [], 0
    for i in range(rng.randint(1, 7)):
        q_len = rng.choice([1, 1, 2, 5, 16, 17, 30])
        start = rng.choice([0, 0, 3, 16, 40])
        num_blocks = -(-(start + q_len) // 4) + rng.randint(0, 2)  # tables may run long
        table = tuple(rng.sample(range(next_block, next_block + 60), num_blocks))
        next_block += 60
        slot = rng.choice([-1, *range(num_slots)])
        needs_logits = rng.random() < 0.8
        seqs.append(ScheduledSeq(f"r{i}", tuple(range(q_len)), start, table, slot, needs_logits))
    return seqs


def test_layout_matches_the_eager_metadata() -> None:
    """Every real token sits where the eager step puts it; padding goes to scratch."""
    rng = random.Random(7)
    block_size, pad_block, num_slots, max_seqs = 4, 999, 5, 8
    for _ in range(50):
        seqs = _random_step(rng, num_slots)
        num_tokens = sum(len(s.token_ids) for s in seqs)
        bucket = min(b for b in token_buckets(256) if b >= num_tokens)
        layout = lay_out_mixed(
            seqs,
            bucket,
            max_num_seqs=max_seqs,
            block_size=block_size,
            pad_block=pad_block,
            num_slots=num_slots,
        )
        meta = AttentionMetadata.build(
            [len(s.token_ids) for s in seqs],
            [s.start_position + len(s.token_ids) for s in seqs],
            [s.block_table for s in seqs],
            block_size,
        )
        ids, positions, cache_slots, logits_rows = (row.tolist() for row in layout.longs)
        n = len(seqs)
        assert ids[:num_tokens] == [t for s in seqs for t in s.token_ids]
        assert positions[:num_tokens] == meta.positions.tolist()
        assert cache_slots[:num_tokens] == meta.slot_mapping.tolist()
        assert set(cache_slots[num_tokens:]) <= {pad_block * block_size}
        qsl = layout.query_start_loc.tolist()
        assert qsl[: n + 1] == list(meta.query_start_loc)
        assert qsl[n:] == [num_tokens] * (max_seqs + 1 - n)  # padding sequences: no tokens
        assert layout.context_lens.tolist() == list(meta.context_lens)
        width = layout.block_tables.shape[1]
        assert layout.block_tables.tolist() == meta.block_tables[:, :width].tolist()
        sampled = [meta.query_start_loc[i + 1] - 1 for i, s in enumerate(seqs) if s.needs_logits]
        assert layout.num_sampled == len(sampled) and logits_rows[: len(sampled)] == sampled
        # The SGMV grouping: each slot's tokens in batch order, as build_meta has them.
        token_slots = [s.adapter_slot for s in seqs for _ in s.token_ids]
        lora = build_meta(token_slots, [8] * num_slots, "cpu")
        starts = layout.seg_starts.tolist()
        order = layout.sorted_token_ids.tolist()
        assert starts[-1] == lora.num_active and sorted(order) == list(range(bucket))
        for g, slot in enumerate(lora.seg_slots_host):
            a, b = lora.seg_starts_host[g], lora.seg_starts_host[g + 1]
            assert order[starts[slot] : starts[slot + 1]] == lora.sorted_token_ids[a:b].tolist()


def test_layout_refuses_what_does_not_fit() -> None:
    seq = ScheduledSeq("a", (1, 2, 3), 14, (0,), -1, True)  # 17 tokens of context, 1 block
    kwargs = {"max_num_seqs": 4, "block_size": 16, "pad_block": 9, "num_slots": 2}
    with pytest.raises(ValueError, match="block table"):
        lay_out_mixed([seq], 16, **kwargs)
    ok = dataclasses.replace(seq, block_table=(0, 1))
    with pytest.raises(ValueError, match="do not fit"):
        lay_out_mixed([ok] * 6, 32, **kwargs)  # 6 sequences, room for 4
    with pytest.raises(ValueError, match="do not fit"):
        lay_out_mixed([ok] * 3, 8, **kwargs)  # 9 tokens in 8
    assert lay_out_mixed([ok], 16, **kwargs).num_tokens == 3


ADAPTERS = [(8, "all-linear"), (3, ["q_proj", "v_proj"]), (16, ["gate_proj", "down_proj"])]


@pytest.mark.skipif(
    triton_skip_reason("engine.attention.triton_prefill", "_varlen_paged_kernel") is not None,
    reason="needs CUDA or the Triton interpreter",
)
def test_mixed_graph_forward_matches_eager(tmp_path) -> None:
    """What a mixed-step graph runs (a padded bucket, padding sequences, SGMV over every
    slot with a bounded grid) equals the eager runner: decode rows beside new prompts,
    prompts over a cached prefix, base rows beside adapters, a chunk that does not sample."""
    from engine.attention.triton_backend import attend_triton
    from engine.kv_cache import KVCache
    from engine.lora.peft_format import load_adapter
    from engine.lora.slot_pool import LoraSlotPool
    from engine.mixed_graphs import bucket_forward
    from engine.model.loader import load_model
    from engine.runner import ModelRunner
    from tests.adapter_factory import make_peft_adapter, make_tiny_llama
    from tests.engine.decode_driver import ScheduledDriver

    base = make_tiny_llama(tmp_path / "base", vocab_size=512)
    model = load_model(base, dtype=torch.float32, device="cpu", attend=attend_triton)
    pool = LoraSlotPool(model.config, max_loras=4, max_rank=16, dtype=torch.float32, device="cpu")
    for slot, (r, targets) in enumerate(ADAPTERS):
        folder = make_peft_adapter(
            base, tmp_path / f"a{slot}", r=r, alpha=2 * r, target_modules=targets, seed=slot + 1
        )
        pool.load_into_slot(slot, load_adapter(folder, model.config, 16))
    block_size, num_blocks, max_seqs = 16, 40, 8
    pad_block = num_blocks - 1
    cache = KVCache(model.config, num_blocks, block_size, torch.float32, "cpu")
    runner = ModelRunner(model, cache, pool, lora_backend="torch")
    driver = ScheduledDriver(runner, pad_block, seed=5)
    gen = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(3, 512, (length,), generator=gen).tolist()

    for i, (slot, length) in enumerate([(0, 5), (-1, 17), (2, 3), (1, 20)]):
        driver.add(f"r{i}", prompt(length), slot)
    driver.step()  # prefill, eagerly: these decode in the mixed step below
    driver.add("new0", prompt(23), 1)
    driver.add("new1", prompt(9), -1)
    driver.requests["r1"].tokens += prompt(6)  # a prompt continued over a cached prefix
    batch = driver.batch()
    seqs = list(batch.seqs)
    seqs[4] = dataclasses.replace(seqs[4], needs_logits=False)  # a chunk that does not sample
    batch = dataclasses.replace(batch, seqs=tuple(seqs))
    expected = runner._forward(batch)  # [num_sampled, vocab]

    buffers = StaticMixedBuffers(64, max_seqs, 8, pool.max_loras, torch.device("cpu"))
    buffers.longs.fill_(3)  # stale values of an earlier step
    logits = torch.full((max_seqs, model.config.vocab_size), float("nan"))
    for with_lora in (True, False):
        if not with_lora:  # the base graph on a step of base rows only
            seqs = [dataclasses.replace(s, adapter_slot=-1) for s in batch.seqs]
            batch = dataclasses.replace(batch, seqs=tuple(seqs))
            expected = runner._forward(batch)
        bucket = 64  # 3 decode rows + 7 + 23 + 9 tokens = 42: 22 padding tokens, 2 sequences
        layout = lay_out_mixed(
            batch.seqs,
            bucket,
            max_num_seqs=max_seqs,
            block_size=block_size,
            pad_block=pad_block,
            num_slots=pool.max_loras,
        )
        buffers.fill(layout, pool.slot_ranks)
        forward = bucket_forward(
            model, cache, buffers, pool if with_lora else None, bucket, logits, 8 * block_size
        )
        forward()
        got = logits[: layout.num_sampled]
        assert layout.num_sampled == len(expected) == 5
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
