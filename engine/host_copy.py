"""Host-to-device copies that never make the host wait for the device.

A plain `.to("cuda")` or `copy_` from pageable memory synchronises with the stream, so
the engine loop would sit idle until the step in flight ends. These go through pinned
memory instead (the caching host allocator keeps each buffer until its copy is done),
so the copy queues behind the running step and the host moves on.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(
    values: object, device: torch.device | str, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """A host list, array or tensor as a new tensor of `dtype` on `device`."""
    host = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, values: np.ndarray) -> None:
    """Overwrite `dst` (any device) with a host array of its shape."""
    host = torch.from_numpy(values)
    if dst.device.type != "cuda":
        dst.copy_(host)
        return
    dst.copy_(host.pin_memory(), non_blocking=True)
