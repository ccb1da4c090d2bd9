"""Real models for tests: the bundled default model, tiny random Llama-family models saved
as servable Hugging Face folders, and a minimal paged driver for our `LlamaModel`.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
from torch import Tensor

from engine.attention import AttentionMetadata
from engine.kv_cache import KVCache
from engine.model.default_model import ensure_default_model
from engine.model.llama import LlamaModel
from engine.model.lora_hook import LoraApplier

TINY_KINDS = ("llama31", "qwen2", "mistral", "llama_tied")
# The SmolLM2 tokenizer's vocabulary, so its copied tokenizer files serve the tiny models.
TOKENIZER_VOCAB = 49152
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def default_model_dir() -> Path:
    """The converted default model, under $LORAPLEX_CACHE_DIR or ~/.cache/loraplex/models."""
    cache = os.environ.get("LORAPLEX_CACHE_DIR") or Path.home() / ".cache" / "loraplex" / "models"
    return ensure_default_model(Path(cache))


def tokenizer_source_dir() -> Path:
    """Where the SmolLM2 tokenizer files come from: $LORAPLEX_TEST_TOKENIZER_DIR (a GPU
    machine without the gguf package carries them there), else the default model."""
    carried = os.environ.get("LORAPLEX_TEST_TOKENIZER_DIR")
    return Path(carried) if carried else default_model_dir()


def make_tiny_model(kind: str, folder: Path, seed: int = 0, **sizes: int) -> Path:
    """Save a random tiny model of `kind` (one of TINY_KINDS) plus the SmolLM2 tokenizer
    into `folder`; weights are non-trivial (random norms and Qwen2 biases). `sizes`
    override the shape fields (hidden_size, num_attention_heads, ...)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TOKENIZER_VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.05,
        max_position_embeddings=1024,
    )
    common.update(sizes)
    if kind == "llama31":
        config = LlamaConfig(
            num_hidden_layers=3,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            # A short original context puts the head's frequencies in all three llama3 bands.
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            **common,
        )
    elif kind == "qwen2":
        config = Qwen2Config(
            num_hidden_layers=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            **common,
        )
    elif kind == "mistral":
        config = MistralConfig(num_hidden_layers=2, sliding_window=None, **common)
    elif kind == "llama_tied":
        config = LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **common)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {TINY_KINDS}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param))
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    source = tokenizer_source_dir()
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


class PagedDriver:
    """Drives `LlamaModel` through a real KVCache the way a runner would, for tests.

    Blocks come from a shuffled free list, so tables are non-contiguous on purpose.
    """

    def __init__(
        self, model: LlamaModel, num_blocks: int = 512, block_size: int = 4, seed: int = 0
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.cache = KVCache(model.config, num_blocks, block_size, model.dtype, model.device)
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.context_lens: dict[int, int] = {}

    def step(self, chunks: list[tuple[int, list[int]]], lora: LoraApplier | None = None) -> Tensor:
        """Run one flat batch of `(seq_id, new_token_ids)` chunks; returns `[num_chunks, vocab]`
        logits of each chunk's last token. Unknown seq ids start new sequences."""
        query_lens, context_lens, tables, input_ids = [], [], [], []
        for seq_id, tokens in chunks:
            table = self.block_tables.setdefault(seq_id, [])
            ctx = self.context_lens.get(seq_id, 0) + len(tokens)
            while len(table) * self.block_size < ctx:
                table.append(self.free_blocks.pop())
            self.context_lens[seq_id] = ctx
            query_lens.append(len(tokens))
            context_lens.append(ctx)
            tables.append(list(table))
            input_ids.extend(tokens)
        meta = AttentionMetadata.build(
            query_lens, context_lens, tables, self.block_size, self.model.device
        )
        last = torch.tensor(meta.query_start_loc[1:], device=self.model.device) - 1
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.model.device)
        return self.model(ids, meta.positions, meta, self.cache, lora, last)

    def generate(
        self, seq_id: int, prompt: list[int], num_tokens: int, first_chunk: int | None = None
    ) -> tuple[list[int], list[Tensor]]:
        """Greedy-decode `num_tokens` tokens alone; the prompt is prefilled in two chunks
        when `first_chunk` is given. Returns the tokens and each step's logits `[vocab]`."""
        split = first_chunk or len(prompt)
        if split < len(prompt):
            self.step([(seq_id, prompt[:split])])
        logits = self.step([(seq_id, prompt[split:])])[0]
        tokens, all_logits = [], []
        for _ in range(num_tokens):
            all_logits.append(logits)
            tokens.append(int(logits.argmax()))
            if len(tokens) < num_tokens:
                logits = self.step([(seq_id, [tokens[-1]])])[0]
        return tokens, all_logits
