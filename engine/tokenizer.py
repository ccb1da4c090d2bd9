"""Turn prompts into token ids and token ids back into text, the way the model expects.

`Tokenizer` wraps the Hugging Face tokenizer of a model folder (local files only) and
adds the engine's contracts: user mistakes in a prompt raise `PromptError` with a
sentence the caller can act on, and everything else (EOS ids, chat template) is read
once at load time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.model.config import ModelFormatError

CHAT_ROLES = ("system", "user", "assistant", "tool")


class PromptError(ValueError):
    """The prompt cannot be tokenized; the message says what the caller must change."""


class Tokenizer:
    """The tokenizer of one model folder.

    Thread-safety: the servicer encodes on worker threads while the engine loop decodes;
    the underlying Rust tokenizer allows concurrent encode/decode as long as nobody
    changes its truncation/padding settings (`hf_tokenizer` is never reconfigured).
    """

    def __init__(self, model_dir: str | Path) -> None:
        """Load the tokenizer files of `model_dir` (no network).

        Raises ModelFormatError if the folder has no loadable tokenizer.
        """
        from transformers import AutoTokenizer

        folder = Path(model_dir)
        try:
            self.hf_tokenizer: Any = AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"cannot load the tokenizer from {folder}: {exc}") from exc
        self.vocab_size: int = len(self.hf_tokenizer)
        # The Rust tokenizer behind a fast (tokenizers-backed) one; None for slow ones.
        self._rust_tokenizer: Any = getattr(self.hf_tokenizer, "_tokenizer", None)
        self.eos_token_ids: frozenset[int] = frozenset(
            _tokenizer_eos_ids(self.hf_tokenizer) | _generation_config_eos_ids(folder)
        )
        self.bos_token_id: int | None = self.hf_tokenizer.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf_tokenizer, "chat_template", None))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt, with the special tokens (e.g. BOS) the model's
        tokenizer adds by default. Raises PromptError if the result is empty."""
        ids = list(self.hf_tokenizer.encode(text, add_special_tokens=True))
        if not ids:
            raise PromptError("the text prompt is empty; send at least one character")
        return ids

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of `(role, content)` messages rendered with the model's chat template,
        followed by the prompt that opens the assistant's turn.

        Raises PromptError for an empty conversation, a role outside CHAT_ROLES, a model
        without a chat template, or a template that refuses the conversation.
        """
        if not messages:
            raise PromptError("the chat prompt has no messages; send at least one")
        for index, (role, _content) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise PromptError(
                    f"chat message {index} has role {role!r}; "
                    f"the allowed roles are {', '.join(CHAT_ROLES)}"
                )
        if not self.has_chat_template:
            raise PromptError(
                "this model's tokenizer has no chat template; send a text prompt instead"
            )
        from jinja2.exceptions import TemplateError

        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            rendered = self.hf_tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as exc:
            raise PromptError(f"the model's chat template refused the messages: {exc}") from exc
        # The template already wrote any BOS/role tokens as text; adding special tokens
        # again would double the BOS (this is what tokenize=True does internally too).
        return list(self.hf_tokenizer.encode(rendered, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. No clean-up of tokenization spaces: decoding must be exactly
        incremental (decode(a + b) starts with decode(a) at character boundaries)."""
        if self._rust_tokenizer is not None:
            # The same call transformers makes underneath, without its per-call overhead:
            # the engine loop decodes twice per generated token.
            return self._rust_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf_tokenizer.decode(
            list(ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )


def _tokenizer_eos_ids(hf_tokenizer: Any) -> set[int]:
    eos = hf_tokenizer.eos_token_id
    return set() if eos is None else {int(eos)}


def _generation_config_eos_ids(folder: Path) -> set[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    eos = raw.get("eos_token_id")
    if eos is None:
        return set()
    return {int(i) for i in eos} if isinstance(eos, list) else {int(eos)}
