"""What the inference clients take and return: plain frozen dataclasses, no protobufs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypedDict


class FinishReason(StrEnum):
    """Why a generation ended. `ERROR` comes with a sentence in `error`."""

    STOP = "stop"  # end of sequence or a stop string
    LENGTH = "length"  # max_new_tokens or the context window
    CANCELLED = "cancelled"  # the adapter was evicted mid-stream, or the call went away
    ERROR = "error"  # the engine failed this request


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """One streamed piece of a generation: `text` is valid UTF-8 on its own and
    `token_ids` are the tokens behind it. The last delta has `finish_reason` and
    `usage` set (and `error` when the reason is ERROR); earlier ones have them None."""

    text: str
    token_ids: tuple[int, ...]
    request_id: str
    adapter_id: str  # the adapter version the request resolved to; "" = the base model
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str = ""


@dataclass(frozen=True)
class Completion:
    """A whole generation: the deltas joined, and how it ended."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    request_id: str
    adapter_id: str
    error: str = ""  # with FinishReason.ERROR: what went wrong, in a sentence


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, user, assistant
    content: str


# A chat message as a ChatMessage or as OpenAI-style {"role": ..., "content": ...}.
Message = ChatMessage | Mapping[str, str]


class SamplingOptions(TypedDict, total=False):
    """Keyword options of every generation call; anything left out (or None) is the
    engine's default (max_new_tokens: the engine's --default-max-new-tokens; temperature 0 =
    greedy; top_p 1; top_k off; no seed; no stop strings)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None  # same seed, same request, same batch -> same tokens
    stop: Sequence[str]  # generation ends before the first occurrence (not in the text)
    ignore_eos: bool
