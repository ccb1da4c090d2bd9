"""Compile Triton kernels ahead, on threads, rather than one by one as a forward reaches them.

A cold start (an empty Triton cache) compiles a few dozen kernel variants, ~0.5 s each
on the H200 host (LLVM, ptxas), one after another as the first runs of the CUDA graph
captures reach them. Inside `compiling_ahead()` every
Triton launch made through `launch` is a compile request instead: the kernel does not
run, its variant (the same one the real launch would pick) goes to a pool of threads,
through Triton's `AsyncCompileMode`, and leaving the block waits for every compile.
The compiles overlap, and the real runs afterwards find each variant compiled. Then,
still on the threads, each compiled variant is loaded onto the device and gets its
launcher, which Triton otherwise does at the variant's first run: up to Triton 3.6 the
launcher is a C module built with gcc on a cold cache, so the captures' first runs
would build them one after another (with nothing left to compile, cold captures of the
8B decode graphs still took 2-5 s longer than warm ones on the H100 host).

A forward run inside the block only gathers its variants: its torch ops still run, over
whatever the skipped kernels left in their outputs, so it must write only to scratch
(as the captures' padding-only forwards do) and nothing may read its results.

Each variant is asked for once: `launch` remembers its requests by what can select a
variant (`_variant_of` each positional argument; the constexprs and options, which
every launch here passes by keyword, as they are), a key at least as fine as Triton's.
Asking Triton at every launch instead (59 forwards of 32 layers, ~20,000 requests) made
the pass take 10 s on a warm cache on the H100 host: a request for a variant whose
compile is pending is not cheap there.

Imports nothing from Triton until a block starts: the kernel modules call `launch`, and
a CPU engine without Triton never opens those.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

log = logging.getLogger(__name__)

# At most this many compile threads: past ~8 the GIL-bound parts of a compile dominate.
MAX_COMPILE_THREADS = 16

# Inside `compiling_ahead()`: the variants requested so far, each with what Triton's
# `warmup` returned for it (a kernel or a pending compile); None outside.
_requested: ContextVar[dict[tuple[Any, ...], Any] | None] = ContextVar("requested", default=None)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`; inside `compiling_ahead()`, a request to compile
    the variant that launch needs (once per variant), without running it."""
    requested = _requested.get()
    if requested is None:
        kernel[grid](*args, **kwargs)
        return
    variant = (kernel, tuple(map(_variant_of, args)), tuple(sorted(kwargs.items())))
    if variant not in requested:
        requested[variant] = kernel.warmup(*args, grid=grid, **kwargs)


def _variant_of(arg: Any) -> Any:
    """What of a launch argument can select a Triton variant: a tensor's dtype and
    16-byte alignment; an int's width, whether it is 1 and whether 16 divides it; a
    float's type; anything else itself."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, int) and not isinstance(arg, bool):
        return ("int", -(2**31) <= arg < 2**31, arg < 2**63, arg == 1, arg % 16 == 0)
    if isinstance(arg, float):
        return float
    return arg


@contextmanager
def compiling_ahead(threads: int | None = None) -> Iterator[bool]:
    """Within the block, `launch` requests compiles on `threads` threads (default: the
    host's cores, at most `MAX_COMPILE_THREADS`); leaving it waits for all of them and
    raises the first compile error. Yields whether launches are compile requests: False
    on a Triton without asynchronous compiles (before 3.4), where they run as usual.
    A block inside another joins it: its requests go to the outer block's threads, and
    only the outer block waits."""
    if _requested.get() is not None:
        yield True
        return
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        yield False
        return
    threads = threads or min(MAX_COMPILE_THREADS, os.cpu_count() or 1)
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    requested: dict[tuple[Any, ...], Any] = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool:
        with AsyncCompileMode(pool):
            token = _requested.set(requested)
            try:
                yield True
            finally:
                _requested.reset(token)
        if device is not None:  # every compile is done
            # Variants of ours that Triton compiles alike share one kernel: load it once.
            done = [k.result() if hasattr(k, "result") else k for k in requested.values()]
            kernels = {id(k): k for k in done if k is not None}
            list(pool.map(functools.partial(_load, device=device), kernels.values()))


def _load(kernel: Any, device: int) -> None:
    """Load a compiled variant onto `device` and build its launcher, as its first run
    would (Triton's private `_init_handles`; nothing where a Triton lacks it). A failure
    is left to that first run, which raises it where the kernel is launched."""
    init = getattr(kernel, "_init_handles", None)
    if init is None:
        return
    try:
        with torch.cuda.device(device):
            init()
    except Exception as exc:  # the first launch raises it again
        log.debug("loading a compiled kernel ahead failed: %s", exc)
