"""CUDA graphs for decode steps: capture the model forward once per batch bucket, replay.

A decode step of B sequences (each one token, each sampling) launches hundreds of
small kernels; replaying a captured graph removes their launch overhead. For every
bucket of `capture_sizes(max_num_seqs)` two graphs are captured:
- base: `lora=None`, for steps where no row has an adapter;
- lora: BGMV shrink/expand on every projection, reading each row's adapter slot, the
  row order and the slot ranks from static device buffers, so one graph serves any
  mix of adapters and base rows (slot -1), and slot reloads between replays (the pool
  buffers are fixed; only their contents and ranks change).
What a graph can not capture is a host-side decision that changes from step to step.
The attention backend reads context lengths and block tables from device memory
(`AttentionMetadata.for_decode_graph`), and the LoRA launch sizes come from bounds
(every row counted active, rank = the pool's `max_rank`) rather than from the batch.

Start-up cost: each graph is run once eagerly (Triton compiles, cuBLAS warms up) and
then captured; with the default 64 sequences that is 9 buckets x 2 graphs, a few
seconds in all, most of it the first Triton compilations. All graphs share one memory
pool (they never run concurrently), captured largest first so the smaller ones reuse
its memory; the logits of every graph land in one shared `[max_bucket, vocab]` buffer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from engine.attention import AttentionMetadata, supports_decode_graphs
from engine.graph_inputs import (
    StaticDecodeBuffers,
    bucket_for,
    capture_sizes,
    is_decode_only,
    pad_decode,
)
from engine.kernels.meta import LoraKernelMeta
from engine.kv_cache import KVCache
from engine.lora.applier import MultiLoraApplier
from engine.lora.slot_pool import LoraSlotPool
from engine.model.llama import LlamaModel
from engine.scheduler import ScheduledSeq
from engine.token_feed import TokenFeed

log = logging.getLogger(__name__)


class BucketGraphs:
    """What decode and mixed-step graphs share: one captured graph per (bucket,
    with_lora), all in one memory pool (they never run concurrently), captured largest
    first so the smaller ones reuse its memory, and a count of replays. A subclass
    says how to build a bucket's forward (`_forward`) and when to replay (`run`)."""

    what = "CUDA"  # in the log line: "captured N <what> graphs"

    def __init__(self, device: torch.device, sizes: tuple[int, ...], lora: bool) -> None:
        self.device = device
        self.sizes = sizes
        self._variants = (False, True) if lora else (False,)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._pool: object | None = None
        self.num_replays = 0  # steps served by a graph (for tests and metrics)

    @property
    def captured(self) -> tuple[tuple[int, bool], ...]:
        """(bucket, with_lora) of every graph captured so far."""
        return tuple(sorted(self._graphs))

    def capture(self, sizes: Sequence[int] | None = None) -> float:
        """Capture the base (and LoRA) graph of every bucket in `sizes` (default: all);
        returns the seconds it took. Must not run while the engine is stepping."""
        start = time.perf_counter()
        todo = sorted(self.sizes if sizes is None else sizes, reverse=True)
        if any(s not in self.sizes for s in todo):
            raise ValueError(f"buckets {todo} are not all among {self.sizes}")
        with torch.cuda.device(self.device):
            for size in todo:
                for with_lora in self._variants:
                    graph = capture_graph(self._forward(size, with_lora), self.device, self._pool)
                    if self._pool is None:
                        self._pool = graph.pool()
                    self._graphs[(size, with_lora)] = graph
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        log.info("captured %d %s graphs in %.1f s", len(self._graphs), self.what, seconds)
        return seconds

    def _bucket(self, rows: int, with_lora: bool) -> int | None:
        """The smallest captured bucket of this variant holding `rows`, or None."""
        return bucket_for(rows, [b for b, lora in self._graphs if lora == with_lora])

    def _replay(self, bucket: int, with_lora: bool) -> None:
        self._graphs[(bucket, with_lora)].replay()
        self.num_replays += 1

    def _forward(self, size: int, with_lora: bool) -> Callable[[], None]:
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
        super().__init__(model.device, capture_sizes(max_num_seqs), self.lora_pool is not None)
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
        with_lora = any(s.adapter_slot >= 0 for s in seqs)
        bucket = self._bucket(len(seqs), with_lora)
        if bucket is None:
            return None
        step = pad_decode(seqs, bucket, self.block_size, self.pad_block)
        ranks: Sequence[int] | torch.Tensor = ()
        if self.lora_pool is not None:
            ranks = self.lora_pool.slot_ranks
            if with_lora:
                # This step's slots are written before the replay reads them; copies
                # into other slots overlap it.
                self.lora_pool.wait_pending(slots={s.adapter_slot for s in seqs})
        self.buffers.fill(step, ranks)
        if feed is not None:
            feed.write_into(self.buffers.input_ids(len(seqs)))
        self._replay(bucket, with_lora)
        return self.logits[: len(seqs)]

    def _forward(self, size: int, with_lora: bool) -> Callable[[], None]:
        b = self.buffers
        b.fill_padding(self.pad_block, self.block_size)
        attn = graph_attention_metadata(b, size, self.block_size, self.max_blocks_per_seq)
        lora = None
        if with_lora:
            assert self.lora_pool is not None
            lora = graph_lora_applier(self.lora_pool, b, size)

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
    pool: LoraSlotPool, buffers: StaticDecodeBuffers, size: int
) -> MultiLoraApplier:
    """BGMV over the static buffers of a `size`-row bucket, sized by bounds: every row
    counted active, the pool's `max_rank` as the batch's rank (the kernels read each
    row's slot and each slot's rank from the buffers and skip slot -1 and rank 0)."""
    seg_starts = torch.zeros(1, dtype=torch.int32, device=pool.device)
    meta = LoraKernelMeta(
        token_slots=buffers.token_slots(size),
        sorted_token_ids=buffers.sorted_token_ids(size),
        seg_starts=seg_starts,  # segments are SGMV's; BGMV never reads them
        seg_slots=seg_starts[:0],
        slot_ranks=buffers.slot_ranks,
        num_tokens=size,
        num_active=size,
        max_seg_len=1,
        max_rank=pool.max_rank,
        seg_starts_host=(0,),
        seg_slots_host=(),
        seg_ranks_host=(),
    )
    return MultiLoraApplier.from_meta(pool, meta, backend="triton", form="bgmv")
