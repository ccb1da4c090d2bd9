"""Incremental detokenization: one token id in, the new text it completes out.

Decoding tokens one at a time is wrong in two ways: a token may carry only part of a
UTF-8 character (byte-level BPE pieces, `<0xE2>` byte-fallback tokens), and many
decoders render a token differently at the start of a text (SentencePiece strips the
leading space of `▁word`). So, as vLLM does, each step decodes a short window twice:
`decode(ids[prefix_offset:read_offset])` (text already emitted) and
`decode(ids[prefix_offset:])` (the same plus the new tokens); the difference is the
delta. While the window's text ends with U+FFFD, a character is still incomplete and
the tokens are held back until a later token completes it (or `flush()`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context so the first output token decodes as it would
# mid-text (with its leading space); a handful covers every decoder's look-behind.
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text deltas of one request's output tokens.

    Contracts:
    - Special tokens (EOS, chat markers) contribute no text.
    - No delta ends inside a character: text ending in U+FFFD is held back, so
      replacement characters appear only where the bytes are really invalid, or at the
      very end of `flush()` when the output stopped mid-character.
    - With an empty `prompt_ids`, the concatenation of all deltas and `flush()` equals
      `tokenizer.decode(output_ids)`. With a prompt, the first delta is rendered in the
      prompt's context: identical for byte-level BPE (Llama 3, Qwen2, SmolLM2); for
      SentencePiece-style decoders it keeps the leading space that decoding the output
      alone would strip, so that prompt text + output text reads as one text.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # ids[prefix_offset:read_offset] is the window whose text was already emitted;
        # ids[read_offset:] are tokens whose text is not out yet.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def push(self, token_id: int) -> str:
        """Add one output token; return the text it completes ("" while held back)."""
        self._ids.append(token_id)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._advance()
        return delta

    def flush(self) -> str:
        """Text of the held-back tokens at the end of the output (may end in U+FFFD if
        the output stopped mid-character). The detokenizer is empty afterwards."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._prefix_offset, len(self._ids))
        delta = new_text[len(self._prefix_text) :]
        self._advance()
        return delta

    @property
    def num_held_tokens(self) -> int:
        """Output tokens whose text has not been emitted yet."""
        return len(self._ids) - self._read_offset

    def _advance(self) -> None:
        # Tokens left of the new window are never decoded again; dropping them keeps a
        # long generation's state to a few ids.
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)
