"""Load every adapter folder under `--adapter-dir` in the background (folder name = id).

The engine serves while this runs: `start` announces every id to the registry first
(`AdapterRegistry.expect`), so a request naming one that is not loaded yet learns it
is still loading (and may wait) instead of hearing it does not exist; ListAdapters
shows what has been loaded so far. A folder that cannot be served is skipped with its
reason in the log: one bad adapter must not keep everyone else's from starting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from engine.formats.errors import AdapterFormatError
from engine.lora.errors import AdapterConflictError
from engine.lora.registry import AdapterRegistry

log = logging.getLogger(__name__)


class AdapterPreloader:
    """`threads` workers load the folders under `adapter_dir`, in name order."""

    def __init__(self, registry: AdapterRegistry, adapter_dir: Path, threads: int) -> None:
        self._registry = registry
        self._folders = sorted(p for p in Path(adapter_dir).iterdir() if p.is_dir())
        self._todo: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._remaining = len(self._folders)
        self._skipped = 0
        self._finished = threading.Event()
        self._stopping = threading.Event()
        self._started_at = 0.0
        self._workers = [
            threading.Thread(target=self._work, name=f"adapter-preload-{i}", daemon=True)
            for i in range(max(1, min(threads, len(self._folders))))
        ]
        if not self._folders:
            self._finished.set()

    def start(self) -> None:
        """Announce every id, then load in the background; returns at once."""
        self._started_at = time.perf_counter()
        self._registry.expect(folder.name for folder in self._folders)
        for folder in self._folders:
            self._todo.put(folder)
        for worker in self._workers:
            worker.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every folder was loaded or skipped; False on timeout."""
        return self._finished.wait(timeout)

    def stop(self) -> None:
        """Load nothing more (loads in progress finish); idempotent."""
        self._stopping.set()
        while True:
            try:
                folder = self._todo.get_nowait()
            except queue.Empty:
                return
            self._registry.settle(folder.name)

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                folder = self._todo.get_nowait()
            except queue.Empty:
                return
            try:
                loaded = self._load(folder)
            finally:
                self._registry.settle(folder.name)
            self._count(loaded)

    def _load(self, folder: Path) -> bool:
        try:
            self._registry.load(folder.name, str(folder))
        except (AdapterFormatError, AdapterConflictError) as exc:  # outside the roots too
            log.error("skipping adapter folder %s: %s", folder, exc)
            return False
        except Exception:  # a bug, or the disk failing: skip this one, keep the rest
            log.exception("skipping adapter folder %s: its load failed", folder)
            return False
        log.info("preloaded adapter %s", folder.name)
        return True

    def _count(self, loaded: bool) -> None:
        with self._lock:
            self._remaining -= 1
            self._skipped += not loaded
            if self._remaining:
                return
        log.info(
            "preloaded %d adapters in %.1f s (%d skipped)",
            len(self._folders) - self._skipped,
            time.perf_counter() - self._started_at,
            self._skipped,
        )
        self._finished.set()
