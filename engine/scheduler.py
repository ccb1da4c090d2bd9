"""Iteration-level continuous batching (pure Python, no torch).

Each `schedule()` call decides what the next model step computes, in this order:

1. Decode tokens of running sequences (admission order) always come first.
2. Prompt tokens: the next chunk of running sequences still in prefill (admission
   order), then new sequences from the waiting queue. They share what is left of
   `max_num_batched_tokens`, and while the step carries decode tokens at most
   `max_mixed_prefill_tokens` of them, so an arriving long prompt cannot stall
   running streams; a step without decodes gives prompts the whole budget.
3. Admission (skipped in a step that had to preempt), in this order:
   a. overdue sequences, the longest-waiting first (see "Waiting bound");
   b. ready sequences, base-model ones and those whose adapter already sits in a
      slot: the tenant with the fewest running sequences first, then those whose
      adapter already has requests running, then arrival (a preempted sequence keeps
      its arrival). An adapter holds its slot until its last request ends, so its
      requests are admitted together: split across admission waves, a few late ones
      would pin the slot, and keep other adapters out, for a whole generation.
   It stops at the first sequence whose KV blocks do not fit (a long prompt is not
   overtaken for ever), at `max_num_seqs`, or when the prompt budget is spent. A
   sequence whose adapter is in no slot is never admitted: step 4 places its adapter
   and it is ready from the next step on.
4. Slot fills (prefetch): the adapters in no slot with the most waiting requests go
   into free slots, then into slots whose idle adapter no waiting request needs
   (least recently used first); a pinned slot, or an idle one still needed, is never
   taken. The copies are `ScheduledBatch.slot_loads`; admission is over by then, so
   no sequence of the batch reads a slot being filled and the copy overlaps compute.

Waiting bound: a sequence that has waited `max_wait_steps` schedule() calls (since
its arrival or its preemption) is overdue. While the oldest overdue sequence lacks
KV blocks, a seat in the batch or prompt budget, nothing else is admitted. While it
lacks a slot, the pinned adapter with the fewest requests in flight is drained (it
takes no new requests) and the first slot that is free or idle goes to the overdue
adapter, before any other; the rest is admitted as usual. Running sequences always
end and nothing joins what it waits for, so it is admitted at most `max_wait_steps`
calls plus the time the drained adapter's requests (or the running sequences holding
the blocks it needs) take to finish once it is the oldest overdue sequence.

Preemption: when KV blocks run out for a running sequence, the latest admitted one
not already in this step's batch is preempted: its blocks and slot are freed and it
is recomputed later from its tokens (prompt + generated), so nothing is lost.

Overlapped steps: the engine may schedule step N+1 while step N still runs on the
device. `on_step_launched` records what a launched step computes and gives each
sampling sequence an `UNRESOLVED` token, the one step N is sampling; step N+1 feeds
it as a decode token (the runner reads it from the device) and `on_tokens` writes
the real id in once step N's tokens reach the host. A sequence whose last token would
reach its `max_tokens` is not given another decode step meanwhile.

Host cost: O(running + admitted * log(queues) + ready queues + max_loras) per step;
a queue holds one tenant's waiting requests for one adapter and only those of the
base model and resident adapters are read, so the waiting queue is never walked.
`add`, `finish` and preemption are O(1) (O(log adapters) for the waiting counts).
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

from engine.block_allocator import BlockAllocator, blocks_needed
from engine.lora.slots import AdapterSlots
from engine.waiting_queue import WaitingQueue

UNRESOLVED = -1  # a token a launched step is sampling, not yet known on the host


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_blocks: int
    max_loras: int
    # Prompt tokens a step may carry beside decode tokens (see the module docstring).
    max_mixed_prefill_tokens: int = 2048
    # schedule() calls a request may wait before it goes first in line.
    max_wait_steps: int = 200

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.max_mixed_prefill_tokens < 1:
            raise ValueError("max_mixed_prefill_tokens must be at least 1")
        if self.max_wait_steps < 1:
            raise ValueError("max_wait_steps must be at least 1")


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it. `token_ids` grows as tokens are sampled."""

    request_id: str
    token_ids: list[int]
    adapter_id: str | None = None
    tenant: str = ""
    arrival: int = 0
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    adapter_slot: int = -1
    waiting_since: int = 0  # schedule() calls made when it last entered the waiting queue
    max_tokens: int | None = None  # prompt + the most tokens it may generate
    num_unresolved: int = 0  # trailing UNRESOLVED tokens (steps in flight)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class ScheduledSeq:
    request_id: str
    token_ids: tuple[int, ...]  # the tokens this step feeds
    start_position: int  # position of token_ids[0]
    block_table: tuple[int, ...]
    adapter_slot: int  # -1 = base model
    needs_logits: bool  # this chunk ends the known tokens: sample the next one


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: tuple[ScheduledSeq, ...]
    # (slot, adapter_id) to copy in now; no sequence of this batch reads these slots
    slot_loads: tuple[tuple[int, str], ...]
    preempted: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.blocks = BlockAllocator(config.num_blocks)
        self.slots = AdapterSlots(config.max_loras)
        self._waiting = WaitingQueue()
        self._running: dict[str, Sequence] = {}  # admission order: preempt from the end
        self._by_id: dict[str, Sequence] = {}
        self._arrivals = 0
        self._steps = 0  # schedule() calls so far: the clock of the waiting bound
        self._slot_for: str | None = None  # adapter the oldest overdue sequence waits for
        self._draining: str | None = None  # adapter taking no new requests meanwhile

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting) or bool(self._running)

    def lora_activity(self) -> tuple[set[str], set[str]]:
        """(adapters of running requests, adapters of waiting requests), for the engine
        loop's snapshot (`engine.snapshot`)."""
        running = {seq.adapter_id for seq in self._running.values() if seq.adapter_id}
        return running, set(self._waiting.adapter_ids())

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def add(self, seq: Sequence) -> None:
        self._arrivals += 1
        seq.arrival = self._arrivals
        self._by_id[seq.request_id] = seq
        self._enqueue(seq)

    def finish(self, request_id: str) -> None:
        """Drops a finished, failed or cancelled sequence and frees its blocks and slot."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return
        if request_id in self._running:
            del self._running[request_id]
        elif request_id in self._waiting:
            self._waiting.remove(seq)
        # Also for a sequence caught between the queues by an error mid-schedule.
        self._release(seq)

    def schedule(self) -> ScheduledBatch:
        self._steps += 1
        batch: list[ScheduledSeq] = []
        in_batch: set[str] = set()  # request ids of `batch`: never preempted this step
        preempted: list[str] = []
        running = list(self._running.values())

        for seq in running:
            if seq.num_tokens - seq.num_computed_tokens == 1 and not seq_at_limit(seq):
                self._schedule_running(seq, 1, batch, in_batch, preempted)
        budget = self.config.max_num_batched_tokens - len(batch)
        if batch:
            budget = min(budget, self.config.max_mixed_prefill_tokens)
        for seq in running:
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1 and budget > 0:
                n = min(remaining, budget)
                if self._schedule_running(seq, n, batch, in_batch, preempted):
                    budget -= n

        if not preempted:
            self._admit(budget, batch)
        slot_loads = self._fill_slots()
        return ScheduledBatch(tuple(batch), tuple(slot_loads), tuple(preempted))

    def on_step_done(self, batch: ScheduledBatch, sampled: dict[str, int]) -> None:
        """Records a step that has run to the end: what it computed, what it sampled."""
        self.on_step_launched(batch)
        self.on_tokens(sampled)

    def on_step_launched(self, batch: ScheduledBatch) -> None:
        """Records what a launched step computes: its tokens count as cached, and each
        sampling sequence gets an UNRESOLVED token until `on_tokens` brings the id."""
        for item in batch.seqs:
            seq = self._by_id.get(item.request_id)
            if seq is None:
                continue
            seq.num_computed_tokens += len(item.token_ids)
            if item.needs_logits:
                seq.token_ids.append(UNRESOLVED)
                seq.num_unresolved += 1

    def on_tokens(self, sampled: dict[str, int]) -> None:
        """Writes in the tokens a step sampled (oldest unresolved first); ids of
        sequences that have finished meanwhile are ignored."""
        for request_id, token in sampled.items():
            seq = self._by_id.get(request_id)
            if seq is None or seq.num_unresolved == 0:
                continue
            seq.token_ids[seq.num_tokens - seq.num_unresolved] = token
            seq.num_unresolved -= 1

    def _schedule_running(
        self,
        seq: Sequence,
        n: int,
        batch: list[ScheduledSeq],
        in_batch: set[str],
        preempted: list[str],
    ) -> bool:
        """Adds n tokens of a running seq to the batch if its blocks can be had."""
        if seq.request_id not in self._running:
            return False  # preempted earlier in this step
        if not self._reserve_blocks(seq, n, in_batch, preempted):
            return False
        batch.append(self._describe(seq, n))
        in_batch.add(seq.request_id)
        return True

    def _admit(self, budget: int, batch: list[ScheduledSeq]) -> None:
        """Admits waiting sequences in the module docstring's order."""
        running_per_tenant = Counter(s.tenant for s in self._running.values())
        self._slot_for = None
        while (seq := self._waiting.oldest()) is not None and self._is_overdue(seq):
            if not self._is_ready(seq.adapter_id):
                self._slot_for = seq.adapter_id
                break
            n = self._try_admit(seq, budget, batch)
            if n == 0:
                self._draining = None
                return  # it waits for blocks or room: nobody overtakes it
            budget -= n
            running_per_tenant[seq.tenant] += 1
        if self._slot_for is None:
            self._draining = None
        elif self._draining not in self.slots.pinned() and not self._num_placeable():
            pinned = self.slots.pinned()  # every slot is: drain the one that ends first
            self._draining = min(
                pinned, key=lambda a: (pinned[a], self._waiting.num_waiting_for(a)), default=None
            )

        ready: list[str | None] = [None]
        ready += [a for a in self.slots.resident() if a != self._draining and self._is_ready(a)]

        def key(seq: Sequence) -> tuple[int, bool]:
            """(running of its tenant, adapter not running yet): smaller goes first."""
            started = seq.adapter_id is None or self.slots.num_requests(seq.adapter_id) > 0
            return running_per_tenant[seq.tenant], not started

        # Heap of each ready queue's head by (key, arrival). Keys only grow while
        # admitting but for the adapter's own, so a stale key is fixed when it
        # surfaces, and the next head of an adapter just admitted is pushed anew.
        heap = [
            (key(head), head.arrival, head)
            for adapter_id in ready
            for head in self._waiting.heads_for(adapter_id)
        ]
        heapq.heapify(heap)
        while heap:
            seq_key, arrival, seq = heapq.heappop(heap)
            if seq_key != key(seq):
                heapq.heappush(heap, (key(seq), arrival, seq))
                continue
            n = self._try_admit(seq, budget, batch)
            if n == 0:
                break
            budget -= n
            running_per_tenant[seq.tenant] += 1
            after = self._waiting.head(seq.adapter_id, seq.tenant)
            if after is not None:
                heapq.heappush(heap, (key(after), after.arrival, after))

    def _try_admit(self, seq: Sequence, budget: int, batch: list[ScheduledSeq]) -> int:
        """Admits a ready waiting seq with its first chunk; returns the chunk's tokens,
        0 when the budget, the batch size or the KV blocks do not allow it."""
        if budget <= 0 or len(self._running) >= self.config.max_num_seqs:
            return 0
        n = min(seq.num_tokens, budget)
        need = blocks_needed(n, self.config.block_size)
        if not self.blocks.can_allocate(need):
            return 0
        self._waiting.remove(seq)
        seq.block_table = self.blocks.allocate(need)
        if seq.adapter_id is not None:
            seq.adapter_slot, needs_load = self.slots.acquire(seq.adapter_id)
            assert not needs_load, "only sequences whose adapter is resident are admitted"
        self._running[seq.request_id] = seq
        batch.append(self._describe(seq, n))
        return n

    def _fill_slots(self) -> list[tuple[int, str]]:
        """Places adapters that waiting requests need into slots (step 4 of the order),
        the oldest overdue sequence's adapter first."""
        loads: list[tuple[int, str]] = []

        def wanted(adapter_id: str) -> bool:
            return self._waiting.num_waiting_for(adapter_id) > 0

        overdue = self._slot_for
        if overdue is not None and wanted(overdue) and self.slots.slot_of(overdue) is None:
            slot = self.slots.place(overdue, keep=lambda a: wanted(a) and a != self._draining)
            if slot is None:  # the overdue one outranks whoever else wants an idle slot
                slot = self.slots.place(overdue, keep=lambda _: False)
            if slot is not None:
                loads.append((slot, overdue))
        limit = self.slots.num_placeable(wanted)
        if limit:
            resident = self.slots.slot_of
            for adapter_id in self._waiting.most_wanted(limit, lambda a: resident(a) is not None):
                slot = self.slots.place(adapter_id, keep=wanted)
                assert slot is not None, "num_placeable counted this slot"
                loads.append((slot, adapter_id))
        return loads

    def _num_placeable(self) -> int:
        return self.slots.num_placeable(keep=lambda _: False)

    def _is_overdue(self, seq: Sequence) -> bool:
        return self._steps - seq.waiting_since >= self.config.max_wait_steps

    def _is_ready(self, adapter_id: str | None) -> bool:
        """Base model, or an adapter already in a slot that takes new requests."""
        if adapter_id is None:
            return True
        return self.slots.slot_of(adapter_id) is not None and self.slots.can_acquire(adapter_id)

    def _reserve_blocks(
        self, seq: Sequence, n: int, in_batch: set[str], preempted: list[str]
    ) -> bool:
        """Makes room for n more tokens of seq, preempting the latest admitted sequence
        not in this step's batch (seq itself, at worst) while blocks are short."""
        need = blocks_needed(seq.num_computed_tokens + n, self.config.block_size)
        need -= len(seq.block_table)  # admission may have reserved them
        if need <= 0:
            return True  # the common decode step: the last block has room
        while not self.blocks.can_allocate(need):
            victim = next(
                s for s in reversed(self._running.values()) if s.request_id not in in_batch
            )
            del self._running[victim.request_id]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        seq.block_table.extend(self.blocks.allocate(need))
        return True

    def _enqueue(self, seq: Sequence, front: bool = False) -> None:
        seq.waiting_since = self._steps
        self._waiting.add(seq, front)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed_tokens = 0
        self._enqueue(seq, front=True)  # it arrived before what waits behind it

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        if seq.adapter_slot >= 0 and seq.adapter_id is not None:
            self.slots.release(seq.adapter_id)
        seq.adapter_slot = -1

    def _describe(self, seq: Sequence, n: int) -> ScheduledSeq:
        if seq.num_unresolved and n != 1:  # only a decode may feed a token in flight
            raise RuntimeError(f"request {seq.request_id} would feed unresolved tokens")
        start = seq.num_computed_tokens
        return ScheduledSeq(
            request_id=seq.request_id,
            token_ids=tuple(seq.token_ids[start : start + n]),
            start_position=start,
            block_table=tuple(seq.block_table),
            adapter_slot=seq.adapter_slot,
            needs_logits=start + n == seq.num_tokens,
        )


def seq_at_limit(seq: Sequence) -> bool:
    """It holds every token it may have (the last maybe still being sampled)."""
    return seq.max_tokens is not None and seq.num_tokens >= seq.max_tokens
