"""CUDA graphs for mixed steps: prefill chunks (beside decode tokens) replayed, not launched.

An eager step of an 8B model launches about a thousand kernels (norms, GEMMs, RoPE,
attention, LoRA shrink/expand per projection), and on the serving host each launch
costs tens of microseconds: a mixed step of 128 new tokens took as long as one of
2,048 (~60 ms, bench/results/serving_h200.md), and every running stream waited for it.
Replaying a captured graph removes that host time. Graphs are captured per token
bucket (`mixed_graph_inputs.token_buckets`), with and without LoRA, over static
buffers: attention is the varlen kernel over a fixed count of sequences (padding ones
have no tokens), and LoRA is SGMV over every slot as a segment, its grid sized by
bounds (`LoraKernelMeta.bounded`), so one graph serves any mix of prompts, decode
rows and adapters that fits its bucket. Larger steps (a pure prefill of many prompts,
where the GEMMs dwarf the launches) run eagerly.

The graphs share one memory pool, captured largest first; their logits land in one
shared `[max rows, vocab]` buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.attention import supports_decode_graphs
from engine.cuda_graphs import BucketGraphs, Variant
from engine.kv_cache import KVCache
from engine.lora.applier import MultiLoraApplier
from engine.lora.slot_pool import LoraSlotPool
from engine.mixed_graph_inputs import (
    StaticMixedBuffers,
    lay_out_mixed,
    seqs_in_bucket,
    token_buckets,
)
from engine.model.llama import LlamaModel
from engine.scheduler import ScheduledSeq
from engine.token_feed import TokenFeed


def bucket_forward(
    model: LlamaModel,
    kv_cache: KVCache,
    buffers: StaticMixedBuffers,
    lora_pool: LoraSlotPool | None,
    bucket: int,
    logits: torch.Tensor,
    max_model_len: int,
) -> Callable[[], None]:
    """The forward of a `bucket`-token step over `buffers`, writing the logits of its
    `seqs_in_bucket` rows into `logits` `[rows, vocab]` float32. With `lora_pool`, SGMV
    over every slot runs after each projection. What a graph captures; it runs
    eagerly too (the CPU tests run it under the Triton interpreter)."""
    attn = buffers.attention_metadata(bucket, kv_cache.block_size, max_model_len)
    lora = None
    if lora_pool is not None:
        meta = buffers.lora_meta(bucket, lora_pool.max_rank)
        lora = MultiLoraApplier.from_meta(lora_pool, meta, backend="triton", form="sgmv")
    rows = seqs_in_bucket(bucket, buffers.max_num_seqs)

    def forward() -> None:
        out = model(
            buffers.input_ids(bucket), buffers.positions(bucket), attn, kv_cache, lora,
            buffers.logits_indices(bucket),
        )  # fmt: skip
        logits[:rows].copy_(out)

    return forward


class MixedGraphs(BucketGraphs):
    """Captured mixed-step forwards for `model`; `run` replays one or says it cannot.

    `pad_block` is the KV block reserved for padding (the scheduler never hands it out),
    `max_model_len` bounds every context (it sizes the block tables), `max_tokens` the
    largest bucket. `lora_pool` None, or `lora_graphs` False, captures base graphs only.
    """

    what = "mixed-step CUDA"

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: KVCache,
        lora_pool: LoraSlotPool | None,
        *,
        max_num_seqs: int,
        max_model_len: int,
        max_tokens: int,
        pad_block: int,
        lora_graphs: bool = True,
    ) -> None:
        if model.device.type != "cuda" or not supports_decode_graphs(model.attend):
            raise ValueError("mixed-step CUDA graphs need a CUDA model with Triton attention")
        if not 0 <= pad_block < kv_cache.num_blocks:
            raise ValueError(f"pad_block {pad_block} is not a block of the KV cache")
        self.lora_pool = lora_pool if lora_graphs else None
        variants: tuple[Variant, ...] = ("base",)
        if self.lora_pool is not None:
            variants = ("base", "sgmv")
        super().__init__(model.device, token_buckets(max_tokens), variants)
        self.model = model
        self.kv_cache = kv_cache
        self.pad_block = pad_block
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        num_slots = lora_pool.max_loras if lora_pool is not None else 0
        max_blocks = -(-max_model_len // kv_cache.block_size)
        self.buffers = StaticMixedBuffers(
            self.sizes[-1], max_num_seqs, max_blocks, num_slots, self.device
        )
        self.logits = torch.empty(
            seqs_in_bucket(self.sizes[-1], max_num_seqs),
            model.config.vocab_size,
            dtype=torch.float32,
            device=self.device,
        )  # [max rows, vocab] f32, every graph's output

    def run(
        self, seqs: Sequence[ScheduledSeq], feed: TokenFeed | None = None
    ) -> torch.Tensor | None:
        """Replay the smallest captured graph that holds this step and return the logits
        of its sampling rows `[num_sampled, vocab]` float32 (a view of the shared buffer,
        valid until the next replay), or None when no graph can run it. `feed` writes
        the tokens still on the device into the input ids first."""
        num_tokens = sum(len(s.token_ids) for s in seqs)
        with_lora = any(s.adapter_slot >= 0 for s in seqs)
        variant: Variant = "sgmv" if with_lora else "base"
        bucket = self._bucket(num_tokens, variant)  # None for LoRA without LoRA graphs
        if bucket is None or len(seqs) > seqs_in_bucket(bucket, self.max_num_seqs):
            return None
        if any(s.start_position + len(s.token_ids) > self.max_model_len for s in seqs):
            return None
        if with_lora and self.lora_pool is not None:
            # This step's slots are written before the replay reads them.
            self.lora_pool.wait_pending(slots={s.adapter_slot for s in seqs})
        num_sampled = self._fill(seqs, bucket)
        if feed is not None:
            feed.write_into(self.buffers.input_ids(bucket))
        self._replay(bucket, variant)
        return self.logits[:num_sampled]

    def _forward(self, size: int, variant: Variant) -> Callable[[], None]:
        self._fill(self._padding_step(size), size)
        pool = self.lora_pool if variant == "sgmv" else None
        return bucket_forward(
            self.model, self.kv_cache, self.buffers, pool, size, self.logits, self.max_model_len
        )

    def _fill(self, seqs: Sequence[ScheduledSeq], bucket: int) -> int:
        layout = lay_out_mixed(
            seqs,
            bucket,
            max_num_seqs=self.max_num_seqs,
            block_size=self.kv_cache.block_size,
            pad_block=self.pad_block,
            num_slots=self.buffers.num_lora_slots,
        )
        ranks = self.lora_pool.slot_ranks if self.lora_pool is not None else ()
        self.buffers.fill(layout, ranks)
        return layout.num_sampled

    def _padding_step(self, bucket: int) -> list[ScheduledSeq]:
        """A step of scratch: `bucket` tokens of one sequence in the padding block's
        first slots, so the capture's warm-up writes nothing a request owns."""
        block = self.kv_cache.block_size
        length = min(bucket, block)  # one block of scratch holds it
        table = (self.pad_block,)
        return [ScheduledSeq("mixed-graph-capture", (0,) * length, 0, table, -1, True)]
