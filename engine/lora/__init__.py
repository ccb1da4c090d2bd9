"""LoRA adapters: the packed host image of a PEFT folder, host residency (registry +
LRU cache), device residency (slot pool) and the per-step applier the model calls.

Importing this package is cheap and torch-free; what the control plane needs (the
folder's rules, config and tensor header) lives in the torch-free `engine.formats`.
"""
