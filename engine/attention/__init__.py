"""Paged attention over the KV cache, behind one backend signature."""

from engine.attention.backend import AttentionBackend, select_backend
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import attend_torch, write_kv

__all__ = ["AttentionBackend", "AttentionMetadata", "attend_torch", "select_backend", "write_kv"]
