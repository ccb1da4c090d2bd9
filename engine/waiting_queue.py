"""The scheduler's waiting requests, indexed so that one step never walks all of them.

Waiting sequences sit in one FIFO queue per (adapter, tenant), in arrival order
(a preempted sequence goes back to the front of its queue: it arrived earlier than
what waits behind it). Beside the queues:
- one FIFO of every waiting sequence by the step it started waiting, whose head is
  the longest-waiting sequence (the waiting bound reads it);
- a count of waiting sequences per adapter, and a max-heap over those counts, so the
  adapter with the most waiting requests is found without scanning the adapters.

Every operation is O(1) or O(log adapters), except `heads_for`, which is O(number of
tenants with requests for that adapter).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.scheduler import Sequence

Queue = OrderedDict[str, "Sequence"]  # request_id -> sequence, front first


class WaitingQueue:
    def __init__(self) -> None:
        self._queues: dict[str | None, dict[str, Queue]] = {}  # adapter -> tenant -> queue
        self._by_wait: OrderedDict[str, Sequence] = OrderedDict()  # by waiting_since
        self._count: dict[str, int] = {}  # adapter -> waiting sequences (adapters only)
        # Entries (-count, tick, adapter); only an adapter's latest entry is valid, the
        # others are skipped when they surface. Ties go to the adapter that reached its
        # count first.
        self._heap: list[tuple[int, int, str]] = []
        self._latest: dict[str, int] = {}  # adapter -> tick of its valid entry
        self._tick = 0

    def __len__(self) -> int:
        return len(self._by_wait)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_wait

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queues seq; `seq.waiting_since` must already be set (it orders `oldest`)."""
        tenants = self._queues.setdefault(seq.adapter_id, {})
        queue = tenants.setdefault(seq.tenant, OrderedDict())
        queue[seq.request_id] = seq
        if front:
            queue.move_to_end(seq.request_id, last=False)
        self._by_wait[seq.request_id] = seq
        self._count_changed(seq.adapter_id, +1)

    def remove(self, seq: Sequence) -> None:
        tenants = self._queues[seq.adapter_id]
        queue = tenants[seq.tenant]
        del queue[seq.request_id]
        if not queue:
            del tenants[seq.tenant]
            if not tenants:
                del self._queues[seq.adapter_id]
        del self._by_wait[seq.request_id]
        self._count_changed(seq.adapter_id, -1)

    def oldest(self) -> Sequence | None:
        """The sequence that has waited the most schedule() calls."""
        return next(iter(self._by_wait.values()), None)

    def heads_for(self, adapter_id: str | None) -> list[Sequence]:
        """The front sequence of each tenant's queue for adapter_id (None = base model)."""
        tenants = self._queues.get(adapter_id, {})
        return [next(iter(queue.values())) for queue in tenants.values()]

    def head(self, adapter_id: str | None, tenant: str) -> Sequence | None:
        queue = self._queues.get(adapter_id, {}).get(tenant)
        return next(iter(queue.values())) if queue else None

    def num_waiting_for(self, adapter_id: str) -> int:
        return self._count.get(adapter_id, 0)

    def adapter_ids(self) -> list[str]:
        """Adapters with waiting requests (a copy, taken in one step: safe to call from
        another thread)."""
        return list(self._count)

    def most_wanted(self, limit: int, skip: Callable[[str], bool]) -> list[str]:
        """Up to `limit` adapters with waiting requests, most waiting requests first,
        leaving out those for which skip(adapter) is true."""
        chosen: list[str] = []
        popped: list[tuple[int, int, str]] = []
        while self._heap and len(chosen) < limit:
            entry = heapq.heappop(self._heap)
            if not self._valid(entry):
                continue
            popped.append(entry)
            if not skip(entry[2]):
                chosen.append(entry[2])
        for entry in popped:  # still valid: no count changed meanwhile
            heapq.heappush(self._heap, entry)
        return chosen

    def _count_changed(self, adapter_id: str | None, delta: int) -> None:
        if adapter_id is None:
            return
        count = self._count.get(adapter_id, 0) + delta
        if count:
            self._tick += 1
            self._count[adapter_id] = count
            self._latest[adapter_id] = self._tick
            heapq.heappush(self._heap, (-count, self._tick, adapter_id))
        else:
            del self._count[adapter_id]
            del self._latest[adapter_id]
        if len(self._heap) > 2 * len(self._latest) + 64:
            # Drop the stale entries that never surfaced (amortised O(1) per change).
            self._heap = [e for e in self._heap if self._valid(e)]
            heapq.heapify(self._heap)

    def _valid(self, entry: tuple[int, int, str]) -> bool:
        return self._latest.get(entry[2]) == entry[1]
