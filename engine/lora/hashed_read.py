"""Read a file into memory once while a helper thread computes its sha256, and skip the
hash on a later read of the same, unchanged file.

The hash follows the read chunk by chunk (hashlib releases the GIL on large buffers),
so checksumming overlaps both the read and whatever the caller does with the bytes
next; a load costs about max(read + decode, hash) instead of their sum. Read buffers
are reused (`ReadBuffers`, the process-wide `READ_BUFFERS`): faulting in a fresh 84 MB
buffer costs more than reading into it.

Verified digests: the sha256 of a file this process has hashed is remembered in a
`DigestCache` (the process-wide one is `VERIFIED_DIGESTS`) under the file's identity as
`os.fstat` reports it on the descriptor actually read: (st_dev, st_ino, st_size,
st_mtime_ns, st_ctime_ns). A read that finds its identity there returns that digest
without hashing. Why a matching identity means the same bytes:
- Every write(2), truncate or fallocate on the file stamps st_ctime with the current
  time, and no system call lets a user set st_ctime; a file replaced by a rename or a
  fresh copy is another inode (or, if the number is reused, carries a newer ctime).
- Kernel timestamps come from a coarse clock, so a write within the same tick as the
  stamp recorded could leave the identity unchanged. A digest is therefore remembered
  only when the file's ctime is `settle_ns` older than the start of the read (any write
  from then on stamps a newer ctime), and only when the identity after the read equals
  the one before (no write was seen during it). A hit whose read ends with another
  identity hashes the bytes it read instead.
- Not covered: a process holding a shared writable mmap of the file (its stores after
  the first write fault leave ctime alone until writeback), a single write(2) still
  copying `settle_ns` after it began, writes below the filesystem (the raw block
  device) and the system clock set back. The cache trusts that files are changed by
  ordinary writes or replacement; pass `digests=None` to hash every read.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

_CHUNK_BYTES = 8 << 20
# The hash function; a module attribute so that tests can count its uses.
_new_hasher = hashlib.sha256

FileIdentity = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns


class DigestCache:
    """Thread-safe LRU map of file identity -> sha256 hex digest, for files whose bytes
    this process has hashed (see the module docstring for when an entry is trusted)."""

    def __init__(self, max_entries: int = 4096, settle_ns: int = 1_000_000_000) -> None:
        self.max_entries = max_entries
        self.settle_ns = settle_ns
        self._entries: OrderedDict[FileIdentity, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, identity: FileIdentity) -> str | None:
        with self._lock:
            digest = self._entries.get(identity)
            if digest is not None:
                self._entries.move_to_end(identity)
            return digest

    def put(self, identity: FileIdentity, digest: str, read_start_ns: int) -> None:
        """Remember `digest` for a file read from `read_start_ns` on (time.time_ns()),
        unless its ctime is too recent to rule out an unseen write in the same tick."""
        if identity[4] > read_start_ns - self.settle_ns:
            return
        with self._lock:
            self._entries[identity] = digest
            self._entries.move_to_end(identity)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class ReadBuffers:
    """Spare read buffers, kept for the next read of a file of the same size (adapters of
    one shape have one size). A fresh buffer pays a page fault per 4 KiB page on its
    first write, which in a VM costs more than the read itself; a reused one is mapped
    already. At most `max_spare_bytes` are kept, the least recently returned go first.
    Thread-safe."""

    def __init__(self, max_spare_bytes: int = 512 << 20) -> None:
        self.max_spare_bytes = max_spare_bytes
        self._spares: list[bytearray] = []  # oldest first
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of exactly `size` bytes, its contents unspecified."""
        with self._lock:
            for i in range(len(self._spares) - 1, -1, -1):
                if len(self._spares[i]) == size:
                    return self._spares.pop(i)
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        """Keep `buffer` for reuse; the caller no longer touches it."""
        if len(buffer) > self.max_spare_bytes:
            return
        with self._lock:
            self._spares.append(buffer)
            while sum(len(b) for b in self._spares) > self.max_spare_bytes:
                self._spares.pop(0)

    def clear(self) -> None:
        with self._lock:
            self._spares.clear()

    @property
    def spare_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._spares)


VERIFIED_DIGESTS = DigestCache()
READ_BUFFERS = ReadBuffers()


class HashedRead:
    """The bytes of one file and, once known, their sha256."""

    def __init__(self, data: bytearray, digest: Future[str], buffers: ReadBuffers | None) -> None:
        self.data = data
        self._digest = digest
        self._buffers = buffers

    def sha256(self) -> str:
        """Hex digest of `data`; waits for the helper thread."""
        return self._digest.result()

    def release(self) -> None:
        """Hand `data` back for reuse by a later read; the caller holds no view of it
        (no tensor made from it) any more. Waits for the hash; `data` is empty after."""
        self._digest.exception()  # the helper thread reads `data` until it is done
        data, self.data = self.data, bytearray()
        if self._buffers is not None and data:
            self._buffers.give(data)


def read_hashed(
    path: Path,
    digests: DigestCache | None = VERIFIED_DIGESTS,
    buffers: ReadBuffers | None = READ_BUFFERS,
) -> HashedRead:
    """The whole file at `path` (OSError when it cannot be read or shrinks meanwhile),
    in a buffer from `buffers` (a fresh one when None) that `HashedRead.release` returns.
    Its digest comes from `digests` when the file is known there, else from hashing the
    bytes read (and is then remembered in `digests`)."""
    start_ns = time.time_ns()
    with open(path, "rb", buffering=0) as handle:
        identity = _identity(os.fstat(handle.fileno()))
        known = digests.get(identity) if digests is not None else None
        size = identity[2]
        data = buffers.take(size) if buffers is not None else bytearray(size)
        view = memoryview(data)
        progress: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        digest: Future[str] = Future()
        if known is None:
            _start_hashing(view, progress, digest)
        try:
            position = 0
            while position < size:
                count = handle.readinto(view[position : position + _CHUNK_BYTES])
                if not count:
                    raise OSError(f"{path} shrank from {size} to {position} bytes while read")
                position += count
                progress.put(position)
        finally:
            progress.put(None)  # the helper always ends, even when the read failed
        unchanged = _identity(os.fstat(handle.fileno())) == identity
    if known is not None:
        if unchanged:
            digest.set_result(known)
        else:  # written while read: the remembered digest may not be these bytes'
            rehash: queue.SimpleQueue[int | None] = queue.SimpleQueue()
            rehash.put(size)
            rehash.put(None)
            _start_hashing(view, rehash, digest)
    elif unchanged and digests is not None:
        digest.add_done_callback(lambda done: _remember(digests, identity, done, start_ns))
    return HashedRead(data, digest, buffers)


def _remember(digests: DigestCache, identity: FileIdentity, done: Future[str], start: int) -> None:
    if done.exception() is None:
        digests.put(identity, done.result(), start)


def _identity(stat: os.stat_result) -> FileIdentity:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _start_hashing(
    view: memoryview, progress: queue.SimpleQueue[int | None], digest: Future[str]
) -> None:
    """Hash `view[:n]` as `progress` reports n bytes read, up to its last report before
    None; the result goes to `digest`."""
    args = (view, progress, digest)
    threading.Thread(target=_hash, args=args, name="sha256", daemon=True).start()


def _hash(view: memoryview, progress: queue.SimpleQueue[int | None], digest: Future[str]) -> None:
    try:
        hasher = _new_hasher()
        hashed = 0
        while (end := progress.get()) is not None:
            hasher.update(view[hashed:end])
            hashed = end
        digest.set_result(hasher.hexdigest())
    except BaseException as exc:  # the waiter must not hang
        digest.set_exception(exc)
