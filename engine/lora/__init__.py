"""LoRA adapters: the PEFT on-disk format, host residency (registry + LRU cache),
device residency (slot pool) and the per-step applier the model calls.

Importing this package is cheap and torch-free: import the submodules you need
(`engine.lora.adapter_header` is what the control plane uses at registration time).
"""
