"""Whether a module's Triton kernels can run here: on CUDA, or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, set before the kernels were first imported)."""

from __future__ import annotations

import importlib
import importlib.util

import torch


def triton_skip_reason(module: str, kernel: str) -> str | None:
    """None if `module.kernel` can run on this machine, else why not (a skip reason)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: the Triton kernels cannot run"
    if torch.cuda.is_available():
        return None
    if importlib.util.find_spec("numpy") is None:
        return "the Triton interpreter needs numpy"
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(getattr(importlib.import_module(module), kernel), InterpretedFunction):
        return "no CUDA and the kernels were compiled before TRITON_INTERPRET=1 was set"
    return None
