"""Paged attention over the KV cache, behind one backend signature."""

from engine.attention.backend import AttentionBackend, select_backend, supports_decode_graphs
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import attend_torch, write_kv

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "attend_torch",
    "select_backend",
    "supports_decode_graphs",
    "write_kv",
]
