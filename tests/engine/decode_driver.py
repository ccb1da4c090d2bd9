"""Drives `ModelRunner.execute` with hand-built `ScheduledBatch`es, as the scheduler would:
one prefill step for every request, then decode steps that feed each sampled token back.

Blocks come from a shuffled free list (non-contiguous tables on purpose) that never
contains the blocks the caller reserves, e.g. the CUDA-graph padding block.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch, ScheduledSeq

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class _Request:
    tokens: list[int]
    adapter_slot: int
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0


class ScheduledDriver:
    def __init__(self, runner: ModelRunner, num_blocks: int, seed: int = 0) -> None:
        self.runner = runner
        self.block_size = runner.kv_cache.block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.requests: dict[str, _Request] = {}

    def add(self, request_id: str, prompt: list[int], adapter_slot: int = -1) -> None:
        self.requests[request_id] = _Request(list(prompt), adapter_slot)

    def set_slot(self, request_id: str, adapter_slot: int) -> None:
        self.requests[request_id].adapter_slot = adapter_slot

    def batch(self, request_ids: list[str] | None = None) -> ScheduledBatch:
        """The next step over `request_ids` (default: all), allocating blocks: each
        request feeds every token it has not computed yet and samples the next one."""
        ids = list(self.requests) if request_ids is None else request_ids
        seqs = []
        for rid in ids:
            req = self.requests[rid]
            while len(req.block_table) * self.block_size < len(req.tokens):
                req.block_table.append(self.free.pop())
            seqs.append(
                ScheduledSeq(
                    request_id=rid,
                    token_ids=tuple(req.tokens[req.num_computed :]),
                    start_position=req.num_computed,
                    block_table=tuple(req.block_table),
                    adapter_slot=req.adapter_slot,
                    needs_logits=True,
                )
            )
        return ScheduledBatch(tuple(seqs), (), ())

    def done(self, batch: ScheduledBatch, sampled: dict[str, int]) -> None:
        """Record that `batch` ran and produced `sampled`."""
        for seq in batch.seqs:
            req = self.requests[seq.request_id]
            req.num_computed = len(req.tokens)
            req.tokens.append(sampled[seq.request_id])

    def step(self, request_ids: list[str] | None = None) -> dict[str, int]:
        """Run `batch(request_ids)` through the runner, greedily; returns the tokens."""
        batch = self.batch(request_ids)
        generators = [torch.Generator() for _ in batch.seqs]
        sampled = self.runner.execute(batch, [GREEDY] * len(batch.seqs), generators)
        self.done(batch, sampled)
        return sampled
