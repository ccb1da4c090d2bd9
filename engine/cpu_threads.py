"""Run a block of torch CPU ops on the calling thread alone, leaving every other thread's
intra-op thread count as it is.

Why: PyTorch (OpenMP builds, the Linux wheels) runs every CPU op over 32,768 elements as
one parallel region of its whole OpenMP team, however little work each member gets, and
the region ends at a barrier that waits for all of them. An 8B adapter's load runs about
400 such ops (the copy of A and the scaled copy of B of most modules); beside it the
sha256 thread, the engine loop and gRPC hold cores, so some team member waits for a core
at nearly every barrier. On 2 cores a hashed load took 76 ms against 59 ms with a team
of one, the hash alone 51 ms (`bench/results/adapter_load_cpu.md`). The load is
memory-bound: one thread packs it nearly as fast as all of them.

Why not `torch.set_num_threads(1)`: it also sets the process-wide count that any thread
starting its first op meanwhile inherits for good (an engine loop starting during a
preload would run a CPU model on one thread). `omp_set_num_threads` sets this thread's
count only. Where the OpenMP runtime is not found, the block runs with torch's count.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import torch  # loads the OpenMP runtime that torch was built with


def _find_omp_set_num_threads():
    """The OpenMP runtime's `omp_set_num_threads`, if torch loaded one into the process."""
    try:
        return getattr(ctypes.CDLL(None), "omp_set_num_threads", None)
    except (OSError, TypeError):  # no process-wide symbol table on this platform
        return None


_omp_set_num_threads = _find_omp_set_num_threads()


@contextmanager
def this_thread_only() -> Iterator[None]:
    """Torch CPU ops inside run on the calling thread; its count is restored after."""
    if _omp_set_num_threads is None:
        yield
        return
    # Torch sets a thread's count at its first op: have that happen before, not inside.
    before = torch.get_num_threads()
    _omp_set_num_threads(1)
    try:
        yield
    finally:
        _omp_set_num_threads(before)
