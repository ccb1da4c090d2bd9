"""The paged KV cache tensors (storage only).

Which blocks are free is the block allocator's business; this module only owns the
memory. A cache slot is `block * block_size + offset`; a sequence's block table lists
the blocks holding its tokens in order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.model.config import ModelConfig


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers (keys and values)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem


def num_blocks_for_bytes(
    config: ModelConfig, block_size: int, dtype: torch.dtype, num_bytes: int
) -> int:
    """How many whole blocks fit in `num_bytes` (0 if not even one does)."""
    return max(0, num_bytes // bytes_per_block(config, block_size, dtype))


class KVCache:
    """Per-layer key/value tensors `[2, num_blocks, block_size, num_kv_heads, head_dim]`.

    Index 0 of the leading dimension holds keys, 1 values. All layers are views of one
    allocation. The memory starts zeroed: attention masks out unused slots, but a masked
    NaN would still poison the softmax-weighted sum, so garbage must at least be finite.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self._storage = torch.zeros(
            (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim),
            dtype=dtype,
            device=self.device,
        )
        self.layers: list[Tensor] = list(self._storage.unbind(0))

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, index: int) -> Tensor:
        """Layer `index`'s cache `[2, num_blocks, block_size, kv_heads, head_dim]`."""
        return self.layers[index]

    def nbytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()
