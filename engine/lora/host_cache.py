"""The host-memory cache of adapters' packed slot images (the registry's CPU tier).

Least recently used first out, with one exception: an adapter with requests in flight
is never evicted, so whatever the engine loop needs to fill a slot is in memory. The
cache therefore holds every adapter in use plus at most `capacity` in total otherwise.
Not thread-safe on its own: the registry calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from engine.lora.peft_format import LoraWeights


class HostCache:
    """`in_use(adapter_id)` says whether an adapter has requests in flight right now."""

    def __init__(self, capacity: int, in_use: Callable[[str], bool]) -> None:
        self.capacity = max(0, capacity)
        self._in_use = in_use
        self._images: OrderedDict[str, LoraWeights] = OrderedDict()  # least recent first

    def get(self, adapter_id: str) -> LoraWeights | None:
        """The cached image, now the most recently used; None when not cached."""
        image = self._images.get(adapter_id)
        if image is not None:
            self._images.move_to_end(adapter_id)
        return image

    def put(self, adapter_id: str, image: LoraWeights) -> None:
        """Cache `image` (kept only while in use when the capacity is 0), then trim."""
        if not self.capacity and not self._in_use(adapter_id):
            return
        self._images[adapter_id] = image
        self._images.move_to_end(adapter_id)
        self.trim()

    def pop(self, adapter_id: str) -> None:
        self._images.pop(adapter_id, None)

    def trim(self) -> None:
        """Evict idle images, least recent first, until at most `capacity` remain or
        only images in use are left."""
        excess = len(self._images) - self.capacity
        for adapter_id in list(self._images):
            if excess <= 0:
                return
            if not self._in_use(adapter_id):
                del self._images[adapter_id]
                excess -= 1

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._images

    def __len__(self) -> int:
        return len(self._images)
