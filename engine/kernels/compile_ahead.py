"""Compile Triton kernels ahead, on threads, rather than one by one as a forward reaches them.

A cold start (an empty Triton cache) compiles a few dozen kernel variants, ~0.5 s each
on the H200 host (LLVM, ptxas, a C launcher built with gcc), one after another as the
first runs of the CUDA graph captures reach them. Inside `compiling_ahead()` every
Triton launch made through `launch` is a compile request instead: the kernel does not
run, its variant (the same one the real launch would pick) goes to a pool of threads,
through Triton's `AsyncCompileMode`, and leaving the block waits for every compile.
The compiles overlap, and the real runs afterwards find each variant compiled.

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

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

# At most this many compile threads: past ~8 the GIL-bound parts of a compile dominate.
MAX_COMPILE_THREADS = 16

# Inside `compiling_ahead()`: the variants requested so far; None outside.
_requested: ContextVar[set[tuple[Any, ...]] | None] = ContextVar("requested", default=None)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`; inside `compiling_ahead()`, a request to compile
    the variant that launch needs (once per variant), without running it."""
    requested = _requested.get()
    if requested is None:
        kernel[grid](*args, **kwargs)
        return
    variant = (kernel, tuple(map(_variant_of, args)), tuple(sorted(kwargs.items())))
    if variant not in requested:
        requested.add(variant)
        kernel.warmup(*args, grid=grid, **kwargs)


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
    with (
        ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool,
        AsyncCompileMode(pool),
    ):
        token = _requested.set(set())
        try:
            yield True
        finally:
            _requested.reset(token)
