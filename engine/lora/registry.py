"""The engine's loaded adapters: names, reference counts, eviction, and a host-memory
LRU cache of their packed slot images (disk ◀ CPU cache; device slots live in the slot
pool).

The cache holds every adapter with requests in flight (those are never evicted, so the
engine loop never reads a disk to fill a slot) plus up to `max_cpu_loras` idle ones,
least recently used leaving first.

Thread-safe: the admin gRPC thread and the preload threads load and evict, the
servicer resolves and acquires, and the engine loop releases and reads weights. One
lock guards the bookkeeping; disk reads and validation happen outside it so a large
load never stalls the engine loop.

Host residency is owned here, device residency by the engine loop (`engine.lora.slots`):
an adapter that leaves the registry reaches the loop by one path, `on_drop`, which the
engine wires to `EngineLoop.forget_adapter` (it posts to the loop's inbox; the loop frees
the slot between steps).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch

from engine.formats.adapter_folder import resolve_adapter_folder
from engine.lora.errors import (
    AdapterConflictError,
    AdapterEvictingError,
    AdapterLoadingError,
    AdapterNotFoundError,
)
from engine.lora.host_cache import HostCache
from engine.lora.loaded_adapter import AdapterEntry, LoadedAdapter
from engine.lora.peft_format import LoraWeights, load_adapter
from engine.model.config import ModelConfig

LoadOutcome = Literal["loaded", "already_loaded"]
EvictOutcome = Literal["evicted", "not_present"]
_MAX_EVICTED_NAMES = 4096


class AdapterRegistry:
    """Adapters known to this engine, by id and alias.

    Host images are packed in `dtype` (the serving dtype) and page-locked when
    `pin_memory`. `on_drop(adapter_id)` (optional) is called, outside the lock, whenever
    an adapter leaves the registry (evicted idle: on the evicting thread; or its last
    in-flight request released: on the releasing thread, usually the engine loop), so
    the owner of device slots can free the adapter's slot. It may be given here or set
    once afterwards (`build_engine` sets it when the engine exists), before any adapter
    is loaded.
    `before_read(adapter_id)` (optional) is called, outside the lock, before each read
    of an adapter's files (load or re-read); the engine passes none, tests hold a load
    there to observe the engine while it is in progress.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        max_rank: int,
        max_cpu_loras: int,
        adapter_roots: tuple[Path, ...] = (),
        pin_memory: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        on_drop: Callable[[str], None] | None = None,
        before_read: Callable[[str], None] | None = None,
    ) -> None:
        self.model_config = model_config
        self.max_rank = max_rank
        self.max_cpu_loras = max(0, max_cpu_loras)
        self.adapter_roots = tuple(Path(root).resolve() for root in adapter_roots)
        self.pin_memory = pin_memory
        self.dtype = dtype
        self.on_drop = on_drop
        self._before_read = before_read
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._alias_to_id: dict[str, str] = {}
        self._cache = HostCache(self.max_cpu_loras, self._in_use)
        # Names (ids and aliases) of evicted adapters, so a caller naming one learns it
        # was evicted rather than never known. Bounded; a load of the name clears it.
        self._evicted: OrderedDict[str, None] = OrderedDict()
        # Ids announced by `expect` whose background load has not finished yet.
        self._expected: set[str] = set()
        # adapter id -> sha256 of the adapter_config.json it was loaded with: a re-read
        # from disk must find the same config, as it must find the same weights.
        self._config_pins: dict[str, str] = {}

    def load(
        self,
        adapter_id: str,
        path: Path | str,
        sha256: str = "",
        tenant: str = "",
        aliases: Iterable[str] = (),
        config_sha256: str = "",
        chunked_sha256: str = "",
    ) -> tuple[LoadOutcome, LoadedAdapter]:
        """Validate and load the adapter folder at `path` under `adapter_id`.
        `chunked_sha256`, registered beside `sha256`, lets the first read check the file
        on several threads (`engine.formats.chunked_digest`).

        Idempotent: the same id with the same content (sha256, and config_sha256 when
        given) is "already_loaded"; the adapter's aliases become exactly `aliases` (new
        ones added, others released). With no `adapter_roots` any path is read (the
        servers refuse LoadAdapter before calling this). Raises AdapterFormatError (its
        AdapterOutsideRoots subclass when the folder or a file the loader opens resolves
        outside the roots; others when the folder is invalid for this base model, or
        `sha256` / `config_sha256` are given and do not match the files),
        AdapterConflictError (the id holds other content or another tenant, or an alias
        belongs to another adapter), AdapterEvictingError (the id is still draining with
        different content).
        """
        if not adapter_id:
            raise ValueError("adapter_id must not be empty")
        aliases = tuple(dict.fromkeys(a for a in aliases if a and a != adapter_id))
        folder = resolve_adapter_folder(path, self.adapter_roots)
        with self._lock:
            self._check_names(adapter_id, aliases)
            existing = self._entries.get(adapter_id)
            if existing is not None and sha256:
                # The caller named the content: answer without reading the file.
                return self._reload_existing(existing, sha256, config_sha256, tenant, aliases)
        weights = self._read(adapter_id, folder, sha256, config_sha256, chunked_sha256)
        with self._lock:
            self._check_names(adapter_id, aliases)
            existing = self._entries.get(adapter_id)
            if existing is not None:
                return self._reload_existing(
                    existing, weights.sha256, weights.config_sha256, tenant, aliases
                )
            entry = AdapterEntry(adapter_id, tenant, list(aliases), weights.summary, folder)
            self._entries[adapter_id] = entry
            self._config_pins[adapter_id] = weights.config_sha256
            for name in (adapter_id, *aliases):
                self._evicted.pop(name, None)
            for alias in aliases:
                self._alias_to_id[alias] = adapter_id
            self._cache.put(adapter_id, weights)
            return "loaded", self._record(entry)

    def resolve(self, name: str) -> LoadedAdapter:
        """The adapter whose id or alias is `name`, if it takes new requests."""
        with self._lock:
            return self._record(self._usable(name))

    def get(self, adapter_id: str) -> LoadedAdapter | None:
        """The record of `adapter_id` in any state, or None."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            return None if entry is None else self._record(entry)

    def list(self) -> list[LoadedAdapter]:
        with self._lock:
            return [self._record(entry) for entry in self._entries.values()]

    def acquire(self, name: str) -> LoadedAdapter:
        """Count one more request in flight on the adapter named `name` (id or alias).
        AdapterNotFoundError / AdapterEvictingError when it takes no new requests."""
        with self._lock:
            entry = self._usable(name)
            entry.in_flight += 1
            entry.last_used = datetime.now(UTC)
            return self._record(entry)

    def release(self, adapter_id: str) -> None:
        """One request on `adapter_id` finished; an evicting adapter leaves at zero."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.in_flight <= 0:
                raise ValueError(f"release({adapter_id!r}) without a matching acquire")
            entry.in_flight -= 1
            dropped = entry.evicting and entry.in_flight == 0
            if dropped:
                self._drop(adapter_id)
            elif entry.in_flight == 0:
                self._cache.trim()  # it may have been held beyond max_cpu_loras
        if dropped and self.on_drop is not None:
            self.on_drop(adapter_id)

    def evict(self, adapter_id: str) -> EvictOutcome:
        """Remove `adapter_id`: at once when idle, else refuse new requests now and
        remove it when its last request releases. Its aliases are released at once, so
        another adapter can take them while this one drains. Idempotent."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return "not_present"
            entry.evicting = True
            for alias in entry.aliases:
                self._alias_to_id.pop(alias, None)
            self._remember_evicted(entry.aliases)
            entry.aliases = []
            dropped = entry.in_flight == 0
            if dropped:
                self._drop(adapter_id)
        if dropped and self.on_drop is not None:
            self.on_drop(adapter_id)
        return "evicted"

    def expect(self, adapter_ids: Iterable[str]) -> None:
        """Announce ids that are about to be loaded in the background: until `settle(id)`,
        naming one that is not loaded yet raises AdapterLoadingError (wait or retry),
        not AdapterNotFoundError."""
        with self._lock:
            self._expected.update(adapter_ids)

    def settle(self, adapter_id: str) -> None:
        """The background load of `adapter_id` finished, loaded or refused."""
        with self._lock:
            self._expected.discard(adapter_id)

    def weights(self, adapter_id: str) -> LoraWeights:
        """The adapter's host image, from the cache or re-read (and re-checked against
        the recorded sha256) from disk; cached while the adapter has requests in
        flight. Works while evicting: admitted requests may still need the adapter
        placed in a slot."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded on this engine")
            cached = self._cache.get(adapter_id)
            if cached is not None:
                return cached
            folder, sha256 = entry.path, entry.summary.sha256
            config_sha256 = self._config_pins.get(adapter_id, "")
        weights = self._read(adapter_id, folder, sha256, config_sha256)
        with self._lock:
            if self._entries.get(adapter_id) is entry:
                self._cache.put(adapter_id, weights)
        return weights

    def __contains__(self, adapter_id: object) -> bool:
        with self._lock:
            return adapter_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _read(
        self,
        adapter_id: str,
        folder: Path,
        sha256: str,
        config_sha256: str,
        chunked_sha256: str = "",
    ) -> LoraWeights:
        if self._before_read is not None:
            self._before_read(adapter_id)
        return load_adapter(
            folder,
            self.model_config,
            self.max_rank,
            dtype=self.dtype,
            pin_memory=self.pin_memory,
            expected_sha256=sha256,
            expected_config_sha256=config_sha256,
            expected_chunked_sha256=chunked_sha256,
        )

    # Everything below runs with the lock held.

    def _check_names(self, adapter_id: str, aliases: tuple[str, ...]) -> None:
        if adapter_id in self._alias_to_id:
            raise AdapterConflictError(
                f"adapter id {adapter_id!r} is already an alias of adapter "
                f"{self._alias_to_id[adapter_id]!r}; choose another id"
            )
        for alias in aliases:
            owner = self._alias_to_id.get(alias, alias if alias in self._entries else None)
            if owner is not None and owner != adapter_id:
                raise AdapterConflictError(
                    f"alias {alias!r} already names adapter {owner!r}; evict that adapter "
                    "first or choose another alias"
                )

    def _reload_existing(
        self,
        entry: AdapterEntry,
        sha256: str,
        config_sha256: str,
        tenant: str,
        aliases: tuple[str, ...],
    ) -> tuple[LoadOutcome, LoadedAdapter]:
        pinned = self._config_pins.get(entry.adapter_id, "")
        other_config = bool(config_sha256 and pinned and config_sha256.lower() != pinned)
        if sha256.lower() != entry.summary.sha256 or other_config:
            if entry.evicting:
                raise AdapterEvictingError(
                    f"adapter {entry.adapter_id!r} is being evicted and still serves "
                    f"{entry.in_flight} requests; retry loading new content when they finish"
                )
            what = (
                f"adapter_config.json sha256 {pinned}"
                if other_config
                else (f"sha256 {entry.summary.sha256}")
            )
            raise AdapterConflictError(
                f"adapter {entry.adapter_id!r} is already loaded with different content "
                f"({what}); register the new content under a new id"
            )
        if tenant != entry.tenant:
            raise AdapterConflictError(
                f"adapter {entry.adapter_id!r} is already loaded for tenant "
                f"{entry.tenant!r}, not {tenant!r}"
            )
        # A load declares the adapter's whole alias set: aliases it no longer names are
        # released, so the control plane can move an alias without an eviction.
        for alias in entry.aliases:
            if alias not in aliases:
                self._alias_to_id.pop(alias, None)
        entry.aliases = list(aliases)
        for alias in aliases:
            self._alias_to_id[alias] = entry.adapter_id
            self._evicted.pop(alias, None)
        if entry.evicting:
            entry.evicting = False  # loaded again before it finished draining
            return "loaded", self._record(entry)
        return "already_loaded", self._record(entry)

    def _usable(self, name: str) -> AdapterEntry:
        entry = self._entries.get(self._alias_to_id.get(name, name))
        if entry is None and name in self._expected:
            raise AdapterLoadingError(
                f"adapter {name!r} is still being loaded on this engine (it is starting up)"
            )
        if entry is None and name in self._evicted:
            raise AdapterNotFoundError(
                f"adapter {name!r} was evicted from this engine (retired, or moved to other "
                "engines); ask the control plane's ResolveAdapter where it is served now"
            )
        if entry is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded on this engine")
        if entry.evicting:
            raise AdapterEvictingError(
                f"adapter {name!r} is being evicted from this engine; retry on another engine "
                "or after it is loaded again"
            )
        return entry

    def _in_use(self, adapter_id: str) -> bool:
        entry = self._entries.get(adapter_id)
        return entry is not None and entry.in_flight > 0

    def _drop(self, adapter_id: str) -> None:
        entry = self._entries.pop(adapter_id)
        self._config_pins.pop(adapter_id, None)
        for alias in entry.aliases:
            self._alias_to_id.pop(alias, None)
        self._cache.pop(adapter_id)
        self._remember_evicted([adapter_id, *entry.aliases])

    def _remember_evicted(self, names: Iterable[str]) -> None:
        for name in names:
            self._evicted[name] = None
            self._evicted.move_to_end(name)
        while len(self._evicted) > _MAX_EVICTED_NAMES:
            self._evicted.popitem(last=False)

    def _record(self, entry: AdapterEntry) -> LoadedAdapter:
        return entry.snapshot(in_cpu_cache=entry.adapter_id in self._cache)
