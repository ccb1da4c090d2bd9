"""Iteration-level continuous batching (pure Python, no torch).

Each call to `schedule()` decides what the next model step computes: decode tokens
of running sequences, the next prompt chunk of sequences still in prefill, and new
sequences admitted from the waiting queue. Two resources gate admission: KV blocks
and, for a request with an adapter, a device adapter slot. When blocks run out, the
most recently admitted sequence is preempted: its blocks are freed and it is later
recomputed from its tokens (prompt + what it generated), so nothing is lost.

Fairness: among waiting sequences, those of the tenant with the fewest running
sequences go first (then arrival order), so one hot tenant cannot starve the others;
and a sequence waiting for an adapter slot stops further adapter admissions, so the
busy slots drain and it gets one.

Adapter copies overlap compute: a sequence admitted into a slot that must first be
filled sits out the step in which the copy is issued (its blocks and slot are held),
so that step's forward never reads the slot being written and need not wait for it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine.adapter_slots import AdapterSlots
from engine.block_allocator import BlockAllocator, blocks_needed


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_blocks: int
    max_loras: int

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")


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
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []  # admission order: preempt from the end
        self._by_id: dict[str, Sequence] = {}
        self._arrivals = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def add(self, seq: Sequence) -> None:
        self._arrivals += 1
        seq.arrival = self._arrivals
        self._by_id[seq.request_id] = seq
        self._waiting.append(seq)

    def finish(self, request_id: str) -> None:
        """Drops a finished, failed or cancelled sequence and frees its blocks and slot."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        # Also for a sequence caught between the queues by an error mid-schedule.
        self._release(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []
        slot_loads: list[tuple[int, str]] = []

        index = 0
        while index < len(self._running) and budget > 0:
            seq = self._running[index]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve_blocks(seq, n, preempted):
                break  # seq itself was the last admitted and got preempted
            scheduled.append(self._describe(seq, n))
            budget -= n
            index += 1

        if not preempted:
            budget = self._admit(budget, scheduled, slot_loads)
        return ScheduledBatch(tuple(scheduled), tuple(slot_loads), tuple(preempted))

    def on_step_done(self, batch: ScheduledBatch, sampled: dict[str, int]) -> None:
        """Records what the step computed and the tokens it sampled."""
        for item in batch.seqs:
            seq = self._by_id.get(item.request_id)
            if seq is None:
                continue
            seq.num_computed_tokens += len(item.token_ids)
            token = sampled.get(item.request_id)
            if token is not None:
                seq.token_ids.append(token)

    def _admit(
        self, budget: int, scheduled: list[ScheduledSeq], slot_loads: list[tuple[int, str]]
    ) -> int:
        running_per_tenant = Counter(s.tenant for s in self._running)
        skipped: set[int] = set()  # waiting sequences whose adapter has no slot this step
        loading = {slot for slot, _ in slot_loads}
        # Once a sequence waits for a slot, no further adapter sequence is admitted this
        # step: pinning the busy slots again would let them stay busy for ever.
        slot_starved = False
        while budget > 0 and len(self._running) < self.config.max_num_seqs:
            candidates = [
                s
                for s in self._waiting
                if id(s) not in skipped and not (slot_starved and s.adapter_id is not None)
            ]
            if not candidates:
                break
            seq = min(candidates, key=lambda s: (running_per_tenant[s.tenant], s.arrival))
            if seq.adapter_id is not None and not self.slots.can_acquire(seq.adapter_id):
                skipped.add(id(seq))
                slot_starved = True
                continue
            n = min(seq.num_tokens, budget)
            if not self.blocks.can_allocate(blocks_needed(n, self.config.block_size)):
                break
            self._waiting.remove(seq)
            seq.block_table = self.blocks.allocate(blocks_needed(n, self.config.block_size))
            if seq.adapter_id is not None:
                seq.adapter_slot, needs_load = self.slots.acquire(seq.adapter_id)
                if needs_load:
                    slot_loads.append((seq.adapter_slot, seq.adapter_id))
                    loading.add(seq.adapter_slot)
            self._running.append(seq)
            running_per_tenant[seq.tenant] += 1
            if seq.adapter_slot in loading:
                continue  # runs from the next step, once its slot is filled
            scheduled.append(self._describe(seq, n))
            budget -= n
        return budget

    def _reserve_blocks(self, seq: Sequence, n: int, preempted: list[str]) -> bool:
        """Makes room for n more tokens of seq, preempting the latest admitted if needed."""
        need = blocks_needed(seq.num_computed_tokens + n, self.config.block_size)
        need = max(0, need - len(seq.block_table))  # admission may have reserved them
        while not self.blocks.can_allocate(need):
            victim = self._running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        seq.block_table.extend(self.blocks.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed_tokens = 0
        self._waiting.append(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        if seq.adapter_slot >= 0 and seq.adapter_id is not None:
            self.slots.release(seq.adapter_id)
        seq.adapter_slot = -1

    def _describe(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(
            request_id=seq.request_id,
            token_ids=tuple(seq.token_ids[start : start + n]),
            start_position=start,
            block_table=tuple(seq.block_table),
            adapter_slot=seq.adapter_slot,
            needs_logits=start + n == seq.num_tokens,
        )
