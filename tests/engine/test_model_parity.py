"""Our paged LlamaModel against Hugging Face transformers, token for token (float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.model.loader import load_model
from tests.model_factory import PagedDriver

NEW_TOKENS = 12
LOGITS_ATOL = 1e-3
PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Write a haiku about paged attention."}],
)
MODELS = (
    "tiny_llama31_path",
    "tiny_qwen2_path",
    "tiny_mistral_path",
    "tiny_llama_tied_path",
    "default_model_path",
)


def _render(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(i) for i in ids]


def _hf_greedy(hf_model, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    out = hf_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, [step[0] for step in out.logits]


@pytest.fixture(scope="module", params=MODELS)
def model_pair(request: pytest.FixtureRequest):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder: Path = request.getfixturevalue(request.param)
    ours = load_model(folder, dtype=torch.float32, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return ours, theirs, tokenizer


def test_greedy_generation_matches_transformers(model_pair) -> None:
    ours, theirs, tokenizer = model_pair
    driver = PagedDriver(ours, block_size=4)
    num_prompts = 3 if ours.config.num_layers < 10 else 2
    for seq_id, messages in enumerate(PROMPTS[:num_prompts]):
        prompt = _render(tokenizer, messages)
        hf_tokens, hf_logits = _hf_greedy(theirs, prompt)
        # Chunked prefill: the second chunk attends to the first through the cache.
        tokens, logits = driver.generate(
            seq_id, prompt, len(hf_tokens), first_chunk=len(prompt) // 2 + 1
        )
        assert tokens == hf_tokens
        for step, (mine, ref) in enumerate(zip(logits, hf_logits, strict=True)):
            diff = (mine - ref).abs().max().item()
            assert diff < LOGITS_ATOL, f"prompt {seq_id} step {step}: max |diff| {diff}"


def test_mixed_batch_equals_sequences_alone(model_pair) -> None:
    ours, _, tokenizer = model_pair
    prompts = [_render(tokenizer, messages) for messages in PROMPTS]
    a, b, c = prompts
    alone = PagedDriver(ours, seed=1)
    # Reference: each sequence on its own, same chunk boundaries as the batch below.
    alone.step([(0, a)])
    ref_a = alone.step([(0, [7])])
    ref_a2 = alone.step([(0, [8])])
    alone.step([(1, b[:5])])
    ref_b = alone.step([(1, b[5:])])
    ref_b2 = alone.step([(1, [9])])
    ref_c = alone.step([(2, c)])

    batched = PagedDriver(ours, seed=2)
    batched.step([(0, a), (1, b[:5])])
    # One step mixing a decode token, a prefill continuation and a fresh prefill.
    step1 = batched.step([(1, b[5:]), (0, [7]), (2, c)])
    # Then two decode tokens of different context lengths in one batched gather.
    step2 = batched.step([(0, [8]), (1, [9])])

    torch.testing.assert_close(step1[0], ref_b[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step1[1], ref_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step1[2], ref_c[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step2[0], ref_a2[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step2[1], ref_b2[0], atol=1e-4, rtol=1e-4)


def test_first_layer_only_runs_one_layer_then_all_again(tiny_llama31_path: Path) -> None:
    """The compile-ahead pass's one-layer forward is a one-layer model (here: other
    logits), and leaving the block serves with every layer again, same logits as before."""
    model = load_model(tiny_llama31_path, dtype=torch.float32, device="cpu")
    prompt = list(range(3, 20))
    before = PagedDriver(model).step([(0, prompt)])
    with model.first_layer_only():
        assert len(model.layers) == 1
        one_layer = PagedDriver(model).step([(0, prompt)])
    assert len(model.layers) == model.config.num_layers > 1
    assert not torch.allclose(one_layer, before, atol=1e-3)
    torch.testing.assert_close(PagedDriver(model).step([(0, prompt)]), before)
