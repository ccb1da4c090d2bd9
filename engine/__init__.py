"""The loraplex engine: one base model, many LoRA adapters, one continuous batch."""
