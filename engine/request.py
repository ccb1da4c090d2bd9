"""Plain data exchanged between the gRPC servicer and the engine loop."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from engine.sampling import SamplingParams


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class EngineRequest:
    """A validated request: everything a user can get wrong was refused before this."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams  # max_new_tokens resolved: default applied, within the context window
    adapter_id: str | None = None  # resolved id; None = base model
    tenant: str = ""


@dataclass(frozen=True)
class RequestOutput:
    """One streamed piece. The last one has finish_reason set."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
