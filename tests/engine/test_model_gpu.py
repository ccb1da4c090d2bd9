"""CUDA checks of the model and the reference attention (run through the device tool)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from engine.model.loader import load_model
from tests.model_factory import PagedDriver

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SmolLM2-shaped Llama (no tokenizer needed: prompts are token ids)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpu-llama")
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_cuda_greedy_matches_transformers(gpu_llama_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    ours = load_model(gpu_llama_path, dtype=torch.float32, device="cuda")
    theirs = AutoModelForCausalLM.from_pretrained(str(gpu_llama_path), dtype=torch.float32)
    theirs = theirs.cuda().eval()
    prompt = torch.randint(3, 49152, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    out = theirs.generate(
        torch.tensor([prompt], device="cuda"),
        max_new_tokens=12,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens, logits = PagedDriver(ours, block_size=16).generate(0, prompt, 12, first_chunk=20)
    assert tokens == out.sequences[0, len(prompt) :].tolist()
    for mine, ref in zip(logits, out.logits, strict=True):
        assert (mine - ref[0]).abs().max().item() < 1e-3


def test_cuda_bf16_batch32_decode(gpu_llama_path: Path) -> None:
    ours = load_model(gpu_llama_path, dtype=torch.bfloat16, device="cuda")
    driver = PagedDriver(ours, num_blocks=32 * 40, block_size=16)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 49152, (500 + 3 * s,), generator=gen).tolist() for s in range(32)]
    for seq, prompt in enumerate(prompts):
        driver.step([(seq, prompt)])
    batch = driver.step([(seq, [6]) for seq in range(32)])  # [32, vocab]
    assert torch.isfinite(batch).all()
    alone = PagedDriver(ours, num_blocks=32 * 40, block_size=16, seed=3)
    for seq in (0, 31):
        alone.step([(seq, prompts[seq])])
        ref = alone.step([(seq, [6])])[0]
        # bf16: a batch of 32 and a batch of 1 take different GEMM kernels and decode
        # splits, so sums round differently; logits of magnitude 8-16 have a 0.0625 ulp.
        torch.testing.assert_close(batch[seq], ref, atol=0.15, rtol=0.05)

    torch.cuda.synchronize()
    start, steps = time.perf_counter(), 20
    for _ in range(steps):
        driver.step([(seq, [7]) for seq in range(32)])
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / steps * 1e3
    print(f"\nbatch-32 decode step (8 layers, ctx ~550, eager, bf16): {per_step:.2f} ms")
