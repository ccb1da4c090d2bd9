"""Everything a user can get wrong in a GenerateRequest is refused here, with a
sentence that says what to fix. The engine loop only ever sees valid requests."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from engine.request import EngineRequest
from engine.sampling import SamplingParams
from engine.tokenizer import PromptError, Tokenizer
from loraplex.v1 import inference_pb2


class InvalidRequest(ValueError):
    """Maps to INVALID_ARGUMENT; the message is shown to the caller."""


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    default_max_new_tokens: int


def prompt_token_ids(
    request: inference_pb2.GenerateRequest, tokenizer: Tokenizer, limits: RequestLimits
) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("the request has no prompt: set one of text, chat or token_ids")
    if kind == "text" or kind == "chat":
        if kind == "text" and not request.text:
            raise InvalidRequest("the prompt text is empty")
        try:
            ids = (
                tokenizer.encode_text(request.text)
                if kind == "text"
                else tokenizer.render_chat([(m.role, m.content) for m in request.chat.messages])
            )
        except PromptError as exc:
            raise InvalidRequest(str(exc)) from exc
    else:
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidRequest("token_ids is empty: give at least one prompt token")
        for index, token in enumerate(ids):
            if token >= limits.vocab_size:
                raise InvalidRequest(
                    f"token_ids[{index}] = {token} is outside the vocabulary "
                    f"(valid ids are 0..{limits.vocab_size - 1})"
                )
    if len(ids) >= limits.max_model_len:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens but the context window is "
            f"{limits.max_model_len} tokens, leaving no room to generate; shorten the prompt"
        )
    return ids


def sampling_params(
    request: inference_pb2.GenerateRequest, prompt_len: int, limits: RequestLimits
) -> SamplingParams:
    s = request.sampling
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(s, name)):
            raise InvalidRequest(f"sampling.{name} must be a finite number")
    room = limits.max_model_len - prompt_len
    params = SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        # The engine's default must never be what a caller is blamed for.
        max_new_tokens=s.max_new_tokens or min(limits.default_max_new_tokens, room),
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
    )
    try:
        params.validate(limits.max_model_len)
    except ValueError as exc:
        raise InvalidRequest(f"sampling: {exc}") from exc
    # Generation also ends at the context window: bound the budget by the room left.
    if params.max_new_tokens > room:
        params = replace(params, max_new_tokens=room)
    return params


def to_engine_request(
    request: inference_pb2.GenerateRequest,
    request_id: str,
    tokenizer: Tokenizer,
    limits: RequestLimits,
    adapter_id: str | None,
    tenant: str,
) -> EngineRequest:
    ids = prompt_token_ids(request, tokenizer, limits)
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=tuple(ids),
        params=sampling_params(request, len(ids), limits),
        adapter_id=adapter_id,
        tenant=tenant,
    )
