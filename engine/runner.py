"""Turns a scheduled batch into tensors, runs the model, samples.

The scheduler hands over plain data (`ScheduledBatch`); this module is where it meets
the device: one flat token batch, attention metadata, per-token adapter slots. On CUDA
a decode-only step replays a captured graph when one fits (`engine.cuda_graphs`), and
so does a mixed step of up to the largest mixed bucket (`engine.mixed_graphs`); every
other step (CPU, or too large) runs the model eagerly.
`launch` only queues the step, so the engine loop schedules the next step and streams
the previous step's text while the GPU computes; the next step's decode tokens come from
this step's samples on the device (`engine.token_feed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata
from engine.cuda_graphs import DecodeGraphs
from engine.host_copy import to_device
from engine.kernels.compile_ahead import compiling_ahead
from engine.kv_cache import KVCache
from engine.lora.applier import MultiLoraApplier
from engine.lora.peft_format import LoraWeights
from engine.lora.slot_pool import LoraSlotPool
from engine.mixed_graphs import MixedGraphs
from engine.model.llama import LlamaModel
from engine.sampling import SamplingParams, sample_tokens
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.token_feed import TokenFeed, token_feed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingStep:
    """A launched step: its sampled tokens land in `tokens` (host memory) once `done`."""

    request_ids: list[str]  # the rows that sampled, in order
    tokens: torch.Tensor  # [len(request_ids)] long, on the host
    done: torch.cuda.Event | None  # None: already complete (CPU)
    device_tokens: torch.Tensor | None = None  # the same on the device, for the next step

    def rows(self) -> dict[str, int]:
        """Request id -> its row of the sampled tokens."""
        return {request_id: i for i, request_id in enumerate(self.request_ids)}

    def result(self) -> dict[str, int]:
        """Waits for the step (releasing the GIL meanwhile); request id -> token."""
        if self.done is not None:
            self.done.synchronize()
        return dict(zip(self.request_ids, self.tokens.tolist(), strict=True))


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: KVCache,
        lora_pool: LoraSlotPool | None = None,
        lora_backend: str = "torch",
        decode_graphs: DecodeGraphs | None = None,
        mixed_graphs: MixedGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.device
        self.lora_pool = lora_pool
        self.lora_backend = lora_backend
        self.decode_graphs = decode_graphs
        self.mixed_graphs = mixed_graphs

    def load_adapter(self, slot: int, weights: LoraWeights) -> None:
        """Copies an adapter's weights into a device slot (asynchronously on CUDA)."""
        if self.lora_pool is None:
            raise RuntimeError("this engine was started without adapter slots")
        self.lora_pool.load_into_slot(slot, weights)

    def execute(
        self,
        batch: ScheduledBatch,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
    ) -> dict[str, int]:
        """Runs one step; returns the sampled token of each sequence that needed one."""
        return self.launch(batch, params, generators).result()

    def launch(
        self,
        batch: ScheduledBatch,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
        previous: PendingStep | None = None,
    ) -> PendingStep:
        """Queues one step on the device and returns at once (on CUDA): the caller does
        host work while the GPU computes, then collects the tokens with `result()`.
        `previous`: the step launched before, whose samples feed this step's unresolved
        decode tokens."""
        if previous is None:
            feed = token_feed(batch.seqs, None, None)  # None, or raises: nothing to feed from
        else:
            feed = token_feed(batch.seqs, previous.rows(), previous.device_tokens)
        logits = None
        if self.decode_graphs is not None:
            logits = self.decode_graphs.run(batch.seqs, feed)
        if logits is None and self.mixed_graphs is not None:
            logits = self.mixed_graphs.run(batch.seqs, feed)
        if logits is None:
            logits = self._forward(batch, feed)  # [num_sampled, vocab] float32
        sampled_rows = [i for i, s in enumerate(batch.seqs) if s.needs_logits]
        request_ids = [batch.seqs[i].request_id for i in sampled_rows]
        if not sampled_rows:
            return PendingStep(request_ids, torch.empty(0, dtype=torch.long), None)
        tokens = sample_tokens(
            logits,
            [params[i] for i in sampled_rows],
            [generators[i] for i in sampled_rows],
        )  # [num_sampled] long on the device
        if tokens.device.type != "cuda":
            return PendingStep(request_ids, tokens, None, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingStep(request_ids, host, done, tokens)

    def prepare(self, pad_block: int) -> None:
        """Before serving on CUDA: compile the Triton kernels of every graph and of the
        eager warm-up at once on threads (`compiling_ahead`; a cold cache's ~30 variants
        otherwise compile one by one as the runs reach them, and separate passes each
        wait for their slowest compile), then capture the graphs and warm up the eager
        path. `pad_block`: the KV block padding rows write to."""
        graphs = [g for g in (self.decode_graphs, self.mixed_graphs) if g is not None]
        start = time.perf_counter()
        # One layer per forward requests every variant; at 32 layers the full forwards
        # made most of the pass's 4 s on a warm cache (8B on the H100 host). The model's
        # device is current, so the kernels load onto it (`compiling_ahead` takes it).
        with torch.cuda.device(self.device), compiling_ahead(), self.model.first_layer_only():
            for bucket_graphs in graphs:
                bucket_graphs.compile_ahead()
            self.warm_up(pad_block)  # no graph is captured yet: every shape runs eagerly
        log.info("compiled the Triton kernels ahead in %.1f s", time.perf_counter() - start)
        for bucket_graphs in graphs:
            bucket_graphs.capture()
        log.info("warmed up the eager path in %.1f s", self.warm_up(pad_block))

    def warm_up(self, pad_block: int) -> float:
        """Runs eager steps of every shape class the Triton kernels specialise on (token
        tiles of 16/32/64 rows, split and unsplit LoRA reductions, each rank bucket up to
        the pool's), so that no request waits on a JIT compile. Tokens write only into
        `pad_block` (scratch the scheduler never hands out); slots keep their zeros, so
        the LoRA kernels run at full rank and add nothing. Returns the seconds taken."""
        start = time.perf_counter()
        pool = self.lora_pool
        ranks = [0]
        if pool is not None:
            ranks = [r for r in (16, 32, 64, 128, 256) if r <= pool.max_rank] or [pool.max_rank]
        saved = pool.slot_ranks.clone() if pool is not None else None
        block = self.kv_cache.block_size
        num_slots = pool.max_loras if pool is not None else 1

        def seq(index: int, length: int, slot: int) -> ScheduledSeq:
            table = (pad_block,) * -(-length // block)
            return ScheduledSeq(f"warm-up-{index}", (0,) * length, 0, table, slot, True)

        try:
            for rank in ranks:
                if pool is not None:
                    pool.slot_ranks.fill_(rank)
                slot = 0 if rank else -1
                shapes = [[seq(0, n, slot), seq(1, 1, -1)] for n in (1, 20, 100)]
                shapes.append([seq(i, 128, i % num_slots if rank else -1) for i in range(32)])
                for seqs in shapes:
                    params = [SamplingParams(temperature=0.0)] * len(seqs)
                    generators = [torch.Generator() for _ in seqs]
                    self.execute(ScheduledBatch(tuple(seqs), (), ()), params, generators)
        finally:
            if pool is not None and saved is not None:
                pool.slot_ranks.copy_(saved)
        return time.perf_counter() - start

    def _forward(self, batch: ScheduledBatch, feed: TokenFeed | None = None) -> torch.Tensor:
        """The eager forward: logits `[num_sampled, vocab]` float32 of the rows that sample."""
        input_ids: list[int] = []
        token_slots: list[int] = []
        logits_indices: list[int] = []
        for item in batch.seqs:
            input_ids.extend(item.token_ids)
            token_slots.extend([item.adapter_slot] * len(item.token_ids))
            if item.needs_logits:
                logits_indices.append(len(input_ids) - 1)
        meta = AttentionMetadata.build(
            query_lens=[len(s.token_ids) for s in batch.seqs],
            context_lens=[s.start_position + len(s.token_ids) for s in batch.seqs],
            block_tables=[s.block_table for s in batch.seqs],
            block_size=self.kv_cache.block_size,
            device=self.device,
        )
        ids = to_device(input_ids, self.device)
        if feed is not None:
            feed.write_into(ids)
        return self.model(
            ids,
            meta.positions,
            meta,
            self.kv_cache,
            self._lora_for(token_slots),
            to_device(logits_indices, self.device),
        )

    def _lora_for(self, token_slots: list[int]) -> MultiLoraApplier | None:
        if self.lora_pool is None or max(token_slots) < 0:
            return None  # a batch of base-model rows pays nothing for LoRA
        # Only this step's slots must be written; newer copies overlap the forward.
        self.lora_pool.wait_pending(slots=set(token_slots))
        return MultiLoraApplier(self.lora_pool, token_slots, self.lora_backend)
