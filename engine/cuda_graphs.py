"""CUDA graphs for decode steps: capture the model forward once per batch bucket, replay.

A decode step of B sequences (each one token, each sampling) launches hundreds of
small kernels; replaying a captured graph removes their launch overhead. For every
bucket of `capture_sizes(max_num_seqs)` up to four graphs are captured:
- base: `lora=None`, for steps where no row has an adapter;
- bgmv: BGMV shrink/expand on every projection, reading each row's adapter slot, the
  row order and the slot ranks from static device buffers, so one graph serves any
  mix of adapters and base rows (slot -1), and slot reloads between replays (the pool
  buffers are fixed; only their contents and ranks change);
- sgmv: the same with SGMV over the step's segments (its rows grouped by adapter, also
  from the buffers), for steps whose rows share adapters (`lora_form`): it reads an
  adapter once per tile of 16 rows, where BGMV reads it once per row (242 rows over 32
  adapters: 4.6 ms of a 15 ms step as BGMV, 2.1 ms as SGMV); none for buckets too
  small for rows to share adapters;
- fold, bucket 1 only, where the model has spare rows after each projection's weight
  (`fold_rank` = the pool's `max_rank`): the row's adapter's A is copied there (once
  per slot and slot write, `fold_slot`), so each base GEMM also yields the rank vector
  and only the expand launches: half the LoRA kernels of a lone sequence's step.
What a graph can not capture is a host-side decision that changes from step to step.
The attention backend reads context lengths and block tables from device memory
(`AttentionMetadata.for_decode_graph`), and the LoRA launch sizes come from bounds
(every row counted active, rank = the pool's `max_rank`) rather than from the batch.

Start-up cost: the forwards of all graphs first run once with their Triton launches
made compile requests, so that their kernels compile on threads at once
(`compile_ahead`; the runner does it for all graphs and its eager shapes in one pass);
then each graph is run once eagerly (cuBLAS warms up) and captured. With the default 64
sequences that is 9 buckets: 26 graphs, a few seconds in all on a warm Triton cache.
All graphs share one memory pool (they never run concurrently), captured largest first
so the smaller ones reuse its memory; the logits of every graph land in one shared
`[max_bucket, vocab]` buffer.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from engine.attention import AttentionMetadata, supports_decode_graphs
from engine.graph_inputs import (
    StaticDecodeBuffers,
    bucket_for,
    capture_sizes,
    is_decode_only,
    pad_decode,
)
from engine.kernels import SGMV_MIN_AVG_SEGMENT, shares_adapters
from engine.kernels.compile_ahead import compiling_ahead
from engine.kernels.meta import LoraKernelMeta
from engine.kv_cache import KVCache
from engine.lora.applier import MultiLoraApplier, fold_slot
from engine.lora.slot_pool import LoraSlotPool
from engine.model.llama import LlamaModel
from engine.scheduler import ScheduledSeq
from engine.token_feed import TokenFeed

log = logging.getLogger(__name__)

# A graph variant: "base" (no LoRA), or the form its LoRA kernels take ("fold": the
# shrink folded into the base GEMMs, see `DecodeGraphs`).
Variant = Literal["base", "bgmv", "sgmv", "fold"]


def lora_form(seqs: Sequence[ScheduledSeq]) -> Variant:
    """The variant for a step's rows: base when none has an adapter, SGMV when the rows
    with one share adapters (`shares_adapters`, as for eager steps), else BGMV."""
    slots = [s.adapter_slot for s in seqs if s.adapter_slot >= 0]
    if not slots:
        return "base"
    return "sgmv" if shares_adapters(len(slots), len(set(slots))) else "bgmv"


class BucketGraphs:
    """What decode and mixed-step graphs share: one captured graph per (bucket,
    variant), all in one memory pool (they never run concurrently), captured largest
    first so the smaller ones reuse its memory, and a count of replays. A subclass
    says how to build a bucket's forward (`_forward`) and when to replay (`run`)."""

    what = "CUDA"  # in the log line: "captured N <what> graphs"

    def __init__(
        self, device: torch.device, sizes: tuple[int, ...], variants: tuple[Variant, ...]
    ) -> None:
        self.device = device
        self.sizes = sizes
        self._variants = variants
        self._graphs: dict[tuple[int, Variant], torch.cuda.CUDAGraph] = {}
        self._pool: object | None = None
        self._compiled: set[tuple[int, Variant]] = set()  # graphs compiled ahead
        self.replays: Counter[Variant] = Counter()  # steps served by each variant's graphs

    @property
    def captured(self) -> tuple[tuple[int, Variant], ...]:
        """(bucket, variant) of every graph captured so far."""
        return tuple(sorted(self._graphs))

    def capture(self, sizes: Sequence[int] | None = None) -> float:
        """Capture every variant's graph of every bucket in `sizes` (default: all),
        compiling its kernels ahead first unless `compile_ahead` did; returns the
        seconds it took. Must not run while the engine is stepping."""
        start = time.perf_counter()
        keys = self._keys(sizes)
        with torch.cuda.device(self.device):
            self.compile_ahead(sizes)
            for size, variant in keys:
                graph = capture_graph(self._forward(size, variant), self.device, self._pool)
                if self._pool is None:
                    self._pool = graph.pool()
                self._graphs[(size, variant)] = graph
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        log.info("captured %d %s graphs in %.1f s", len(self._graphs), self.what, seconds)
        return seconds

    def compile_ahead(self, sizes: Sequence[int] | None = None) -> None:
        """Run the forward of every graph of `sizes` (default: all) not compiled ahead
        yet once, with its Triton launches made compile requests (`compiling_ahead`):
        the kernels of all the graphs compile on threads at once, where the captures'
        warm-up runs would compile them one by one (a cold start's 26 variants: ~13 s
        serially on the H200 host). Inside an outer `compiling_ahead()` block, only
        that block's end waits for the compiles."""
        keys = [key for key in self._keys(sizes) if key not in self._compiled]
        with torch.cuda.device(self.device), compiling_ahead():
            for size, variant in keys:
                self._forward(size, variant)()
        self._compiled.update(keys)

    def _keys(self, sizes: Sequence[int] | None) -> list[tuple[int, Variant]]:
        """(bucket, variant) of every graph of `sizes`, largest bucket first."""
        todo = sorted(self.sizes if sizes is None else sizes, reverse=True)
        if any(s not in self.sizes for s in todo):
            raise ValueError(f"buckets {todo} are not all among {self.sizes}")
        return [(size, variant) for size in todo for variant in self._variants]

    def _bucket(self, rows: int, variant: Variant) -> int | None:
        """The smallest captured bucket of this variant holding `rows`, or None."""
        return bucket_for(rows, [b for b, v in self._graphs if v == variant])

    def _replay(self, bucket: int, variant: Variant) -> None:
        self._graphs[(bucket, variant)].replay()
        self.replays[variant] += 1

    @property
    def num_replays(self) -> int:
        """Steps served by a graph, all variants together."""
        return self.replays.total()

    def _forward(self, size: int, variant: Variant) -> Callable[[], None]:
        """Set the buffers to a padding-only step of `size` (the capture's warm-up run
        then writes only to scratch) and return the bucket's forward."""
        raise NotImplementedError


class DecodeGraphs(BucketGraphs):
    """Captured decode forwards for `model`; `run` replays one or says it cannot.

    `pad_block` is a KV block reserved for padding rows: the scheduler must never hand
    it out. `max_model_len` bounds every sequence's context (it sizes the static block
    tables). `lora_pool` None, or `lora_graphs` False (e.g. the torch LoRA backend),
    captures base graphs only; steps with adapters then run eagerly.
    """

    what = "decode CUDA"

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: KVCache,
        lora_pool: LoraSlotPool | None,
        *,
        max_num_seqs: int,
        max_model_len: int,
        pad_block: int,
        lora_graphs: bool = True,
    ) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        if not supports_decode_graphs(model.attend):
            raise ValueError("the model's attention backend cannot run in a CUDA graph")
        if not 0 <= pad_block < kv_cache.num_blocks:
            raise ValueError(f"pad_block {pad_block} is not a block of the KV cache")
        self.lora_pool = lora_pool if lora_graphs else None
        variants: tuple[Variant, ...] = ("base",)
        if self.lora_pool is not None:
            variants = ("base", "bgmv", "sgmv")
            if model.fold_rank == self.lora_pool.max_rank:
                variants += ("fold",)
        self._folded: tuple[int, int] | None = None  # (slot, version) in the spare rows
        super().__init__(model.device, capture_sizes(max_num_seqs), variants)
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.pad_block = pad_block
        self.max_model_len = max_model_len
        max_bucket = self.sizes[-1]
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        num_slots = lora_pool.max_loras if lora_pool is not None else 0
        self.buffers = StaticDecodeBuffers(
            max_bucket, self.max_blocks_per_seq, num_slots, self.device
        )
        self.logits = torch.empty(
            max_bucket, model.config.vocab_size, dtype=torch.float32, device=self.device
        )  # [max_bucket, vocab] f32, every graph's output
        self._logits_indices = torch.arange(max_bucket, dtype=torch.long, device=self.device)

    def run(
        self, seqs: Sequence[ScheduledSeq], feed: TokenFeed | None = None
    ) -> torch.Tensor | None:
        """Replay the smallest captured graph that holds this step and return its logits
        `[len(seqs), vocab]` float32 (a view of the shared output buffer, valid until the
        next replay), or None when the step is not a decode step a graph can run.
        `feed` writes the tokens still on the device into the input ids first."""
        if not is_decode_only(seqs):
            return None
        if any(s.start_position >= self.max_model_len for s in seqs):
            return None
        variant = lora_form(seqs)
        if variant == "bgmv" and len(seqs) == 1 and (1, "fold") in self._graphs:
            variant = "fold"
        bucket = self._bucket(len(seqs), variant)
        if bucket is None:
            return None
        step = pad_decode(
            seqs, bucket, self.block_size, self.pad_block, self.buffers.num_lora_slots
        )
        ranks: Sequence[int] | torch.Tensor = ()
        if self.lora_pool is not None:
            ranks = self.lora_pool.slot_ranks
            if variant != "base":
                # This step's slots are written before the replay reads them; copies
                # into other slots overlap it.
                self.lora_pool.wait_pending(slots={s.adapter_slot for s in seqs})
            if variant == "fold":
                self._fold(seqs[0].adapter_slot)
        self.buffers.fill(step, ranks)
        if feed is not None:
            feed.write_into(self.buffers.input_ids(len(seqs)))
        self._replay(bucket, variant)
        return self.logits[: len(seqs)]

    def _fold(self, slot: int) -> None:
        """Have the spare rows hold `slot`'s A as it is now (a copy when they do not)."""
        assert self.lora_pool is not None
        key = (slot, self.lora_pool.slot_versions[slot])
        if self._folded != key:
            fold_slot(self.model.layers, self.lora_pool, slot)
            self._folded = key

    def _keys(self, sizes: Sequence[int] | None) -> list[tuple[int, Variant]]:
        # Fewer rows than SGMV_MIN_AVG_SEGMENT never share adapters (`lora_form`), and
        # a fold serves one row, whose base output stays contiguous beside its h.
        keys = super()._keys(sizes)
        return [
            (s, v)
            for s, v in keys
            if (v != "sgmv" or s >= SGMV_MIN_AVG_SEGMENT) and (v != "fold" or s == 1)
        ]

    def _forward(self, size: int, variant: Variant) -> Callable[[], None]:
        b = self.buffers
        b.fill_padding(self.pad_block, self.block_size)
        attn = graph_attention_metadata(b, size, self.block_size, self.max_blocks_per_seq)
        lora = None
        if variant != "base":
            assert self.lora_pool is not None
            lora = graph_lora_applier(self.lora_pool, b, size, variant)

        def forward() -> None:
            logits = self.model(
                b.input_ids(size), b.positions(size), attn, self.kv_cache, lora,
                self._logits_indices[:size],
            )  # fmt: skip
            self.logits[:size].copy_(logits)

        return forward


def capture_graph(
    forward: Callable[[], None], device: torch.device, pool: object | None
) -> torch.cuda.CUDAGraph:
    """Capture `forward` into a new graph in memory `pool` (None: a new pool). One eager
    run comes first, on a side stream: Triton compiles and cuBLAS picks its kernels
    outside the capture. `forward` must write k/v only to scratch (padding) slots."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        forward()
    return graph


def graph_attention_metadata(
    buffers: StaticDecodeBuffers, size: int, block_size: int, max_blocks_per_seq: int
) -> AttentionMetadata:
    """Attention metadata of a `size`-row bucket over the static buffers."""
    return AttentionMetadata.for_decode_graph(
        block_size,
        slot_mapping=buffers.slot_mapping(size),
        positions=buffers.positions(size),
        block_tables=buffers.tables(size),
        context_lens=buffers.context_lens(size),
        max_context_len=max_blocks_per_seq * block_size,
    )


def graph_lora_applier(
    pool: LoraSlotPool,
    buffers: StaticDecodeBuffers,
    size: int,
    variant: Literal["bgmv", "sgmv", "fold"],
) -> MultiLoraApplier:
    """LoRA of `variant` (fold: BGMV's expand after a folded shrink) over the static
    buffers of a `size`-row bucket, sized by bounds:
    every row counted active, the pool's `max_rank` as the batch's rank (the kernels
    read each row's slot, each slot's rank and, for SGMV, the segments of rows from the
    buffers, and skip slot -1, rank 0 and empty segments). SGMV only replays steps that
    `lora_form` gives it, whose rows average `SGMV_MIN_AVG_SEGMENT` per adapter, so at
    most `size // SGMV_MIN_AVG_SEGMENT` segments are not empty: the grid (one tile per
    16 rows plus one per segment) stays that small however many slots the pool has."""
    form = "sgmv" if variant == "sgmv" else "bgmv"
    slots = min(buffers.num_lora_slots, max(1, size // SGMV_MIN_AVG_SEGMENT))
    meta = LoraKernelMeta(
        token_slots=buffers.token_slots(size),
        sorted_token_ids=buffers.sorted_token_ids(size),
        seg_starts=buffers.seg_starts,  # BGMV reads no segments, SGMV no token slots
        seg_slots=buffers.seg_slots,
        slot_ranks=buffers.slot_ranks,
        num_tokens=size,
        num_active=size,
        # SGMV in tiles of 16 rows: the segments of a decode step are a few rows each.
        max_seg_len=1 if form == "bgmv" else 16,
        max_rank=pool.max_rank,
        seg_starts_host=(0,) * (slots + 1),
        seg_slots_host=tuple(range(slots)),
        seg_ranks_host=(pool.max_rank,) * slots,
        bounded=True,
    )
    return MultiLoraApplier.from_meta(pool, meta, "triton", form, folded=variant == "fold")
