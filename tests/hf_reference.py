"""Reference outputs from Hugging Face transformers (+ peft), the ground truth of the tests."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@lru_cache(maxsize=4)
def _base(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_model(model_dir: Path, adapter_dir: Path | None = None):
    if adapter_dir is None:
        return _base(str(model_dir))
    from peft import PeftModel

    # A fresh base each time: peft injects its layers into the model it wraps.
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@torch.no_grad()
def hf_greedy(
    model, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...] = ()
) -> list[int]:
    """Greedy tokens by plain argmax over full forwards with a KV cache (no generate()
    heuristics), stopping after an EOS token if eos_ids is given."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model(input_ids=ids, use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token in eos_ids:
            break
        out = model(
            input_ids=torch.tensor([[token]], device=model.device),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return tokens
