"""What the engine loop publishes for other threads: one frozen `EngineSnapshot`.

The scheduler and the adapter slots belong to the engine loop thread: only it reads or
changes them. Everything another thread wants to know about them (GetEngineInfo,
ListAdapters' residency, the metrics collectors, the servicer's queue cap) comes from
the snapshot the loop last published: it builds a new one after each step and after
applying inbox messages, and publishes it with one attribute assignment (atomic under
the GIL). A reader sees one consistent state, at most a step old, and never touches
a container the loop is changing.

Building one is O(running + resident adapters + adapters with waiting requests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from engine.scheduler import Scheduler


@dataclass(frozen=True)
class EngineSnapshot:
    steps: int  # model steps whose tokens have been collected
    num_running: int  # requests admitted and holding KV blocks
    num_waiting: int  # requests in the scheduler's queue (not those still in the inbox)
    kv_blocks_total: int
    kv_blocks_free: int
    max_loras: int  # adapter slots on the device
    slot_of: Mapping[str, int]  # resident adapter id -> its device slot
    num_pinned_slots: int  # slots whose adapter has requests in flight
    running_adapters: frozenset[str]  # adapters of running requests
    waiting_adapters: frozenset[str]  # adapters of waiting requests

    @classmethod
    def of(cls, scheduler: Scheduler, steps: int) -> EngineSnapshot:
        """The state of `scheduler` now; call it on the thread that owns it."""
        running, waiting = scheduler.lora_activity()
        return cls(
            steps=steps,
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_blocks_total=scheduler.blocks.num_blocks,
            kv_blocks_free=scheduler.blocks.num_free_blocks,
            max_loras=scheduler.slots.max_loras,
            slot_of=MappingProxyType(scheduler.slots.resident()),
            num_pinned_slots=scheduler.slots.num_pinned,
            running_adapters=frozenset(running),
            waiting_adapters=frozenset(waiting),
        )
