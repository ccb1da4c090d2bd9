"""CUDA-graph decode, the parts that need no CUDA: bucket choice, padding, static-buffer
filling, and the captured forward itself run eagerly on the CPU (the graph's metadata
and LoRA applier over static buffers, Triton kernels interpreted) against the eager
runner. `test_cuda_graphs_gpu.py` captures and replays for real.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.cuda_graphs import (  # noqa: E402
    graph_attention_metadata,
    graph_lora_applier,
    lora_form,
)
from engine.graph_inputs import (  # noqa: E402
    StaticDecodeBuffers,
    bucket_for,
    capture_sizes,
    is_decode_only,
    pad_decode,
)
from engine.scheduler import ScheduledSeq  # noqa: E402


def _seq(
    rid: str, tokens: tuple[int, ...], start: int, table: tuple[int, ...], slot: int = -1
) -> ScheduledSeq:
    return ScheduledSeq(rid, tokens, start, table, slot, needs_logits=True)


def test_capture_sizes() -> None:
    assert capture_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert capture_sizes(1) == (1,)
    assert capture_sizes(13) == (1, 2, 4, 8, 13)
    assert capture_sizes(40) == (1, 2, 4, 8, 16, 24, 32, 40)
    big = capture_sizes(200)
    assert big[-4:] == (128, 160, 192, 200) and list(big) == sorted(set(big))
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_bucket_for() -> None:
    sizes = capture_sizes(64)
    assert [bucket_for(n, sizes) for n in (1, 3, 8, 13, 17, 32, 33, 64)] == [
        1,
        4,
        8,
        16,
        24,
        32,
        48,
        64,
    ]
    assert bucket_for(65, sizes) is None and bucket_for(0, sizes) is None


def test_is_decode_only() -> None:
    decode = _seq("a", (5,), 9, (1,))
    assert is_decode_only([decode, _seq("b", (7,), 0, (2,))])
    assert not is_decode_only([decode, _seq("b", (7, 8), 0, (2,))])  # a prefill chunk
    no_logits = ScheduledSeq("c", (3,), 4, (1,), -1, needs_logits=False)
    assert not is_decode_only([decode, no_logits]) and not is_decode_only([])


def test_pad_decode_layout() -> None:
    seqs = [
        _seq("a", (11,), 17, (7, 3, 9), slot=2),  # position 17: block 3, offset 1
        _seq("b", (12,), 0, (5,)),
        _seq("c", (13,), 15, (4, 8), slot=0),  # last slot of its first block
    ]
    step = pad_decode(seqs, bucket=5, block_size=16, pad_block=99, num_slots=4)
    assert step.num_seqs == 3 and step.bucket == 5
    ids, positions, slot_mapping = step.longs.tolist()
    assert ids == [11, 12, 13, 0, 0]
    assert positions == [17, 0, 15, 0, 0]
    assert slot_mapping == [3 * 16 + 1, 5 * 16, 4 * 16 + 15, 99 * 16, 99 * 16]
    assert step.context_lens.tolist() == [18, 1, 16, 1, 1]
    # Only the blocks each context needs, padded with the scratch block.
    assert step.block_tables.tolist() == [[7, 3], [5, 99], [4, 99], [99, 99], [99, 99]]
    assert step.token_slots.tolist() == [2, -1, 0, -1, -1]
    assert step.sorted_token_ids.tolist() == [2, 0, 1, 3, 4]
    # Segments of the slots present (0: row 2, then 2: row 0), then empty ones.
    assert step.seg_starts.tolist() == [0, 1, 2, 2, 2] and step.seg_slots.tolist()[:2] == [0, 2]
    with pytest.raises(ValueError):
        pad_decode(seqs, bucket=2, block_size=16, pad_block=99)
    with pytest.raises(ValueError):
        pad_decode([_seq("d", (1,), 16, (4,))], bucket=1, block_size=16, pad_block=99)
    with pytest.raises(ValueError, match="outside a pool of 2 slots"):
        pad_decode(seqs, bucket=5, block_size=16, pad_block=99, num_slots=2)


def test_static_buffers_fill() -> None:
    buffers = StaticDecodeBuffers(8, 6, 3, torch.device("cpu"))
    buffers.block_tables.fill_(-7)  # stale values from an earlier step
    seqs = [_seq("a", (11,), 40, (1, 2, 3, 4), slot=1), _seq("b", (12,), 3, (6,))]
    buffers.fill(pad_decode(seqs, 4, 16, 9, num_slots=3), slot_ranks=torch.tensor([4, 8, 0]))
    assert buffers.input_ids(4).tolist() == [11, 12, 0, 0]
    assert buffers.positions(4).tolist() == [40, 3, 0, 0]
    assert buffers.slot_mapping(4).tolist() == [3 * 16 + 8, 6 * 16 + 3, 9 * 16, 9 * 16]
    assert buffers.context_lens(4).tolist() == [41, 4, 1, 1]
    assert buffers.token_slots(4).tolist() == [1, -1, -1, -1]
    assert buffers.sorted_token_ids(4).tolist() == [0, 1, 2, 3]
    assert buffers.slot_ranks.tolist() == [4, 8, 0]
    assert buffers.seg_starts.tolist() == [0, 1, 1, 1] and buffers.seg_slots.tolist()[0] == 1
    assert buffers.tables(4)[:, :3].tolist() == [[1, 2, 3], [6, 9, 9], [9, 9, 9], [9, 9, 9]]
    assert (buffers.tables(4)[:, 3:] == -7).all()  # never read: beyond every context
    # Views are prefixes of fixed storage: a bucket's graph sees every later fill.
    ptr = buffers.context_lens(4).data_ptr()
    buffers.fill(pad_decode(seqs[:1], 1, 16, 9, num_slots=3), slot_ranks=[0, 0, 16])
    assert buffers.context_lens(4).data_ptr() == ptr and buffers.context_lens(1).tolist() == [41]
    assert buffers.slot_ranks.tolist() == [0, 0, 16]
    with pytest.raises(ValueError):
        buffers.fill(pad_decode([_seq("c", (1,), 200, tuple(range(13)))], 1, 16, 9, 3))
    with pytest.raises(ValueError, match="segments"):  # laid out for another pool
        buffers.fill(pad_decode(seqs, 4, 16, 9, num_slots=4))


def _interpreted_triton() -> bool:
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from engine.attention import triton_decode

    return isinstance(triton_decode._paged_decode_kernel, InterpretedFunction)


ADAPTERS = [  # (rank, targets): mixed ranks, one odd, subsets and all seven projections
    (8, "all-linear"),
    (3, ["q_proj", "v_proj"]),
    (16, ["gate_proj", "up_proj", "down_proj", "o_proj"]),
    (5, ["k_proj", "o_proj"]),
    (4, "all-linear"),
]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    from tests.adapter_factory import make_peft_adapter, make_tiny_llama

    root = tmp_path_factory.mktemp("graphs")
    base = make_tiny_llama(root / "base", vocab_size=512)
    adapters = [
        make_peft_adapter(base, root / f"a{i}", r=r, alpha=2 * r, target_modules=t, seed=i + 1)
        for i, (r, t) in enumerate(ADAPTERS)
    ]
    return base, adapters


@pytest.mark.skipif(not _interpreted_triton(), reason="needs the Triton interpreter (no CUDA)")
@pytest.mark.parametrize("form", ["bgmv", "sgmv", "fold"])
def test_graph_forward_matches_eager_on_cpu(tiny_setup, form: str) -> None:
    """What a decode graph runs (static buffers, graph metadata, BGMV or SGMV over static
    slots, padding rows) equals the eager runner, before and after a slot is reloaded,
    for rows that each have their own adapter (BGMV) or share two (SGMV), and for a lone
    row whose adapter's A sits in the model's spare rows (fold)."""
    from engine.attention.triton_backend import attend_triton
    from engine.kv_cache import KVCache
    from engine.lora.applier import fold_slot
    from engine.lora.peft_format import load_adapter
    from engine.lora.slot_pool import LoraSlotPool
    from engine.model.loader import load_model
    from engine.runner import ModelRunner
    from tests.engine.decode_driver import ScheduledDriver

    base, adapter_dirs = tiny_setup
    fold_rank = 16 if form == "fold" else 0
    model = load_model(
        base, dtype=torch.float32, device="cpu", attend=attend_triton, fold_rank=fold_rank
    )
    pool = LoraSlotPool(model.config, max_loras=6, max_rank=16, dtype=torch.float32, device="cpu")
    weights = [load_adapter(d, model.config, 16) for d in adapter_dirs]
    for slot, w in enumerate(weights):
        pool.load_into_slot(slot, w)
    block_size, num_blocks, max_blocks = 16, 40, 8
    pad_block = num_blocks - 1
    cache = KVCache(model.config, num_blocks, block_size, torch.float32, "cpu")
    runner = ModelRunner(model, cache, pool, lora_backend="torch")
    driver = ScheduledDriver(runner, num_blocks - 1, seed=3)
    gen = torch.Generator().manual_seed(0)
    slots = {"bgmv": [0, -1, 3, 1, 4, 2, -1], "sgmv": [0, -1, 3, 0, 3, 0, 3], "fold": [3]}[form]
    lengths = [5, 16, 17, 31, 1, 40, 9][: len(slots)]
    for i, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
        driver.add(f"r{i}", torch.randint(3, 512, (length,), generator=gen).tolist(), slot)
    driver.step()  # prefill, eagerly

    buffers = StaticDecodeBuffers(8, max_blocks, pool.max_loras, torch.device("cpu"))
    bucket = 1 if form == "fold" else 8
    for reload in (False, True):
        if reload:  # another adapter (another rank) in slot 3 between two replays
            pool.load_into_slot(3, weights[2])
        if form == "fold":  # what DecodeGraphs does before the replay
            fold_slot(model.layers, pool, 3)
        batch = driver.batch()
        assert lora_form(batch.seqs) == ("bgmv" if form == "fold" else form)
        expected = runner._forward(batch)  # [7, vocab]
        step = pad_decode(batch.seqs, bucket, block_size, pad_block, pool.max_loras)
        buffers.fill(step, pool.slot_ranks)
        attn = graph_attention_metadata(buffers, bucket, block_size, max_blocks)
        lora = graph_lora_applier(pool, buffers, bucket, form)
        logits = model(
            buffers.input_ids(bucket),
            buffers.positions(bucket),
            attn,
            cache,
            lora,
            torch.arange(bucket),
        )
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits[: len(slots)], expected, atol=1e-4, rtol=1e-4)
        tokens = logits[: len(slots)].argmax(-1).tolist()
        driver.done(batch, {s.request_id: t for s, t in zip(batch.seqs, tokens, strict=True)})


def test_warm_up_runs_every_shape_class_and_leaves_no_trace(tiny_llama31_path) -> None:
    """The start-up warm-up drives real eager steps through the pad block only: the pool's
    slot ranks come back as they were and no other KV block is written."""
    from engine.kv_cache import KVCache
    from engine.lora.slot_pool import LoraSlotPool
    from engine.model.loader import load_model
    from engine.runner import ModelRunner

    model = load_model(tiny_llama31_path, torch.float32, "cpu")
    cache = KVCache(model.config, 8, 16, torch.float32, "cpu")
    pool = LoraSlotPool(model.config, max_loras=4, max_rank=32, dtype=torch.float32, device="cpu")
    pool.slot_ranks[1] = 8
    runner = ModelRunner(model, cache, pool, "torch")  # the GPU bench runs the Triton path
    runner.warm_up(pad_block=7)
    assert pool.slot_ranks.tolist() == [0, 8, 0, 0]
    for layer in cache.layers:
        assert not layer[:, :7].any()  # only block 7 was touched
        assert layer[:, 7].any()
