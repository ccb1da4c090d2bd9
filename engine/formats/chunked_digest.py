"""A digest of a weights file that many cores can check at once.

`chunked_sha256(data)` is the sha256 of the 32-byte sha256 digests of `data`'s
consecutive `CHUNK_BYTES` chunks, concatenated in order (the last chunk may be shorter;
an empty file has no chunks). In a shell:

    python3 -c 'import hashlib, sys; d = open(sys.argv[1], "rb").read(); c = 8 << 20
    print(hashlib.sha256(b"".join(hashlib.sha256(d[i:i + c]).digest()
                                  for i in range(0, len(d), c))).hexdigest())' FILE

Why: a file's plain sha256 is one pass that no second core can help with, 65-120 ms for
an 84 MB adapter on the H200 host, where the rest of its load takes about 30 ms. The
chunks hash on as many threads as there are (hashlib releases the GIL), and the digest
is as binding: two files with equal chunked digests have equal chunks (else sha256
collides). The control plane computes both digests from the bytes it validates at
registration, so an engine that checks the chunked one has checked the plain one too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK_BYTES = 8 << 20


def num_chunks(size: int) -> int:
    return -(-size // CHUNK_BYTES)


def chunk_digest(data: memoryview | bytes, index: int) -> bytes:
    """The sha256 digest of chunk `index` of `data`."""
    return hashlib.sha256(data[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]).digest()


def combine(chunk_digests: Iterable[bytes]) -> str:
    """The chunked sha256 (hex) from the chunks' digests, in order."""
    return hashlib.sha256(b"".join(chunk_digests)).hexdigest()


def file_digests(path: Path) -> tuple[str, str]:
    """The sha256 and the chunked sha256 of the file at `path`, hex, from one read: the
    two always describe the same bytes."""
    whole, chunks = hashlib.sha256(), []
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_BYTES):  # whole chunks until the last
            whole.update(block)
            chunks.append(hashlib.sha256(block).digest())
    return whole.hexdigest(), combine(chunks)


def chunked_sha256(data: memoryview | bytes) -> str:
    """The chunked sha256 of `data`, hex, on this thread."""
    view = memoryview(data)
    return combine(chunk_digest(view, i) for i in range(num_chunks(len(view))))
