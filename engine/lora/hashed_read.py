"""Read a file into memory once while a helper thread computes its sha256.

The hash follows the read chunk by chunk (hashlib releases the GIL on large buffers),
so checksumming overlaps both the read and whatever the caller does with the bytes
next; a load costs about max(read + decode, hash) instead of their sum.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from concurrent.futures import Future
from pathlib import Path

_CHUNK_BYTES = 8 << 20


class HashedRead:
    """The bytes of one file and, once the helper thread is done, their sha256."""

    def __init__(self, data: bytearray, digest: Future[str]) -> None:
        self.data = data
        self._digest = digest

    def sha256(self) -> str:
        """Hex digest of `data`; waits for the helper thread."""
        return self._digest.result()


def read_hashed(path: Path) -> HashedRead:
    """The whole file at `path` (OSError when it cannot be read or shrinks meanwhile)."""
    chunks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
    digest: Future[str] = Future()
    threading.Thread(target=_hash, args=(chunks, digest), name="sha256", daemon=True).start()
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            data = bytearray(size)
            view = memoryview(data)
            position = 0
            while position < size:
                count = handle.readinto(view[position : position + _CHUNK_BYTES])
                if not count:
                    raise OSError(f"{path} shrank from {size} to {position} bytes while read")
                chunks.put(view[position : position + count])
                position += count
    finally:
        chunks.put(None)  # the helper always ends, even when the read failed
    return HashedRead(data, digest)


def _hash(chunks: queue.SimpleQueue[memoryview | None], digest: Future[str]) -> None:
    hasher = hashlib.sha256()
    while (chunk := chunks.get()) is not None:
        hasher.update(chunk)
    digest.set_result(hasher.hexdigest())
