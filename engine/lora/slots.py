"""Which adapter sits in which device slot: the bookkeeping beside the slot pool
(pure Python, no torch). The scheduler decides with it; `slot_pool.LoraSlotPool` holds
the tensors it points into. Only the engine loop thread reads or changes it; other
threads see residency through the loop's published `EngineSnapshot`.

A slot holds one adapter's A/B weights on the device. Slots with requests in flight
are pinned; idle slots keep their adapter (a later request reuses it for free) until
the least recently used idle slot is needed for another adapter. A pinned slot is
never taken from its adapter.

Two ways in: `acquire` pins a slot for a request (loading the adapter first if it is
not resident), `place` puts an adapter in ahead of its requests without pinning it
(prefetch), and only into a free slot or one whose idle adapter the caller lets go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class AdapterSlots:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._slot_of: dict[str, int] = {}
        self._refcount: dict[str, int] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # idle adapters, least recent first
        self._free_slots: list[int] = list(range(max_loras - 1, -1, -1))
        self._forget_when_idle: set[str] = set()

    def slot_of(self, adapter_id: str) -> int | None:
        return self._slot_of.get(adapter_id)

    def resident(self) -> dict[str, int]:
        return dict(self._slot_of)

    @property
    def num_pinned(self) -> int:
        """Slots whose adapter has requests in flight (resident minus idle)."""
        return len(self._slot_of) - len(self._idle)

    def can_acquire(self, adapter_id: str) -> bool:
        if adapter_id in self._forget_when_idle:
            return False
        return adapter_id in self._slot_of or bool(self._free_slots) or bool(self._idle)

    def acquire(self, adapter_id: str) -> tuple[int, bool]:
        """Pins a slot for one request. Returns (slot, needs_load): needs_load means the
        caller must copy the adapter's weights into the slot before the next step."""
        slot = self._slot_of.get(adapter_id)
        needs_load = slot is None
        if slot is None:
            slot = self._take_slot()
            self._slot_of[adapter_id] = slot
            self._refcount[adapter_id] = 0
        self._idle.pop(adapter_id, None)
        self._refcount[adapter_id] += 1
        return slot, needs_load

    def num_requests(self, adapter_id: str) -> int:
        """Requests in flight on `adapter_id` (0 if it sits in no slot)."""
        return self._refcount.get(adapter_id, 0)

    def pinned(self) -> dict[str, int]:
        """Adapters with requests in flight, and how many requests each."""
        return {a: n for a, n in self._refcount.items() if n > 0}

    def num_placeable(self, keep: Callable[[str], bool]) -> int:
        """How many adapters `place(..., keep)` could put in now: free slots plus idle
        slots whose adapter keep() does not protect."""
        return len(self._free_slots) + sum(not keep(a) for a in self._idle)

    def place(self, adapter_id: str, keep: Callable[[str], bool]) -> int | None:
        """Makes a non-resident adapter resident without pinning it: into a free slot,
        else into the slot of the least recently used idle adapter that keep() does not
        protect. Returns the slot the caller must copy the weights into before any
        request reads it, or None when every slot is pinned or protected."""
        if adapter_id in self._slot_of:
            raise ValueError(f"adapter {adapter_id!r} already sits in a slot")
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = next((a for a in self._idle if not keep(a)), None)
            if victim is None:
                return None
            del self._idle[victim]
            del self._refcount[victim]
            slot = self._slot_of.pop(victim)
        self._slot_of[adapter_id] = slot
        self._refcount[adapter_id] = 0
        self._idle[adapter_id] = None  # most recently used: the last idle one to go
        return slot

    def release(self, adapter_id: str) -> None:
        self._refcount[adapter_id] -= 1
        if self._refcount[adapter_id] == 0:
            if adapter_id in self._forget_when_idle:
                self._drop(adapter_id)
            else:
                self._idle[adapter_id] = None

    def forget(self, adapter_id: str) -> None:
        """The adapter left the engine: free its slot now, or when its last request ends."""
        if adapter_id not in self._slot_of:
            return
        if self._refcount[adapter_id] == 0:
            self._drop(adapter_id)
        else:
            self._forget_when_idle.add(adapter_id)

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        if not self._idle:
            raise RuntimeError("no adapter slot is free; check can_acquire() first")
        victim, _ = self._idle.popitem(last=False)
        slot = self._slot_of.pop(victim)
        del self._refcount[victim]
        return slot

    def _drop(self, adapter_id: str) -> None:
        self._free_slots.append(self._slot_of.pop(adapter_id))
        del self._refcount[adapter_id]
        self._idle.pop(adapter_id, None)
        self._forget_when_idle.discard(adapter_id)
