"""Which adapter sits in which device slot (pure Python; the scheduler's view of residency).

A slot holds one adapter's A/B weights on the device. Slots with requests in flight
are pinned; idle slots keep their adapter (a later request reuses it for free) until
the least recently used idle slot is needed for another adapter.
"""

from __future__ import annotations

from collections import OrderedDict


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
        """Slots whose adapter has requests in flight (resident minus idle). Safe to read
        from another thread: never negative, exact once the owner's thread is between
        calls."""
        return max(0, len(self._slot_of) - len(self._idle))

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
