"""On-disk formats, read without torch: the adapter folder (its files, the adapter-root
rule, `adapter_config.json`, the safetensors header) and a base model's checkpoint
fingerprint.

The control plane validates registrations with these modules and the engine loads
with the same ones, so the two cannot disagree about what a folder holds. Nothing
here imports torch (a test holds that): tensor work lives in `engine.lora.peft_format`
and `engine.model.loader`, on top of these.
"""
