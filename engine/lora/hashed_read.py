"""Read a file into memory once while a helper thread computes its sha256, and skip the
hash on a later read of the same, unchanged file.

The hash follows the read chunk by chunk (hashlib releases the GIL on large buffers),
so checksumming overlaps both the read and whatever the caller does with the bytes
next; a load costs about max(read + decode, hash) instead of their sum. Read buffers
are reused (`ReadBuffers`, the process-wide `READ_BUFFERS`): faulting in a fresh 84 MB
buffer costs more than reading into it.

Registered digests: given the (sha256, chunked sha256) pair the control plane recorded
for the file (`engine.formats.chunked_digest`), a read checks the chunked one instead,
hashing each 8 MiB chunk on a shared pool of threads as soon as it is read; the plain
sha256 is then the registered one. A first load of an 84 MB adapter on the H200 host
spends 65-120 ms in one sha256 pass that no other core can share.

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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from engine.formats.chunked_digest import CHUNK_BYTES, chunk_digest, combine, num_chunks

# Threads that hash the chunks of files read with a registered chunked digest, shared by
# every read of the process.
_CHUNK_HASHERS = ThreadPoolExecutor(
    max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="sha256-chunks"
)
# The hash function; a module attribute so that tests can count its uses.
_new_hasher = hashlib.sha256

FileIdentity = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns


class DigestMismatch(Exception):
    """The bytes read do not have the registered chunked sha256; `actual` is theirs."""

    def __init__(self, actual: str) -> None:
        super().__init__(f"chunked sha256 {actual}")
        self.actual = actual


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
        """Hex digest of `data`; waits for the helper threads. After a check against a
        registered chunked digest: the registered sha256, or DigestMismatch."""
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
    registered: tuple[str, str] | None = None,
) -> HashedRead:
    """The whole file at `path` (OSError when it cannot be read or shrinks meanwhile),
    in a buffer from `buffers` (a fresh one when None) that `HashedRead.release` returns.
    Its digest comes from `digests` when the file is known there, else from hashing the
    bytes read (and is then remembered in `digests`). `registered` = (sha256, chunked
    sha256) as registered: the bytes are checked against the chunked one, on threads."""
    start_ns = time.time_ns()
    with open(path, "rb", buffering=0) as handle:
        identity = _identity(os.fstat(handle.fileno()))
        known = digests.get(identity) if digests is not None else None
        size = identity[2]
        data = buffers.take(size) if buffers is not None else bytearray(size)
        view = memoryview(data)
        progress: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        digest: Future[str] = Future()
        chunks: list[Future[bytes]] | None = None
        if known is None and registered is not None and registered[1]:
            chunks = []
        elif known is None:
            _start_hashing(view, progress, digest)
        try:
            position = 0
            while position < size:
                count = handle.readinto(view[position : position + CHUNK_BYTES])
                if not count:
                    raise OSError(f"{path} shrank from {size} to {position} bytes while read")
                position += count
                if chunks is None:
                    progress.put(position)
                    continue
                # Every chunk read in full goes to the hashers at once.
                complete = num_chunks(size) if position == size else position // CHUNK_BYTES
                while len(chunks) < complete:
                    chunks.append(_CHUNK_HASHERS.submit(chunk_digest, view, len(chunks)))
        finally:
            progress.put(None)  # the helper always ends, even when the read failed
        unchanged = _identity(os.fstat(handle.fileno())) == identity
    if chunks is not None:
        assert registered is not None
        _check_when_hashed(chunks, registered, digest)
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


def _check_when_hashed(
    chunks: list[Future[bytes]], registered: tuple[str, str], digest: Future[str]
) -> None:
    """Once every chunk is hashed, resolve `digest` to the registered sha256 when the
    chunked digest matches, else to DigestMismatch."""
    remaining = [len(chunks)]
    lock = threading.Lock()

    def finish() -> None:
        try:
            actual = combine(chunk.result() for chunk in chunks)
        except BaseException as exc:  # the waiter must not hang
            digest.set_exception(exc)
            return
        if actual == registered[1].lower():
            digest.set_result(registered[0].lower())
        else:
            digest.set_exception(DigestMismatch(actual))

    def one_done(_: Future[bytes]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        finish()

    if not chunks:
        finish()
    for chunk in chunks:
        chunk.add_done_callback(one_done)


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
