"""Everything a user can get wrong in a GenerateRequest is refused here, with a
sentence that says what to fix. The engine loop only ever sees valid requests."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

from engine.request import EngineRequest
from engine.sampling import SamplingParams
from engine.tokenizer import PromptError, Tokenizer
from loraplex.v1 import inference_pb2

# A text far longer than the window is refused before it is tokenized in full: past
# PROBE_CHARS_PER_TOKEN characters per window token only its head is tokenized first,
# and if the head alone overflows the window (by more than a cut word can account
# for) the prompt is refused.
PROBE_CHARS_PER_TOKEN = 8
PROBE_SLACK_TOKENS = 64
# Longest vocabulary entry of each tokenizer, in characters, computed on first use.
_token_chars: weakref.WeakKeyDictionary[Tokenizer, int] = weakref.WeakKeyDictionary()


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
        _check_text_fits(request, tokenizer, limits)
        try:
            ids = (
                _encode_text(request.text, tokenizer, limits)
                if kind == "text"
                else tokenizer.render_chat([(m.role, m.content) for m in request.chat.messages])
            )
        except PromptError as exc:
            raise InvalidRequest(str(exc)) from exc
    else:
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidRequest("token_ids is empty: give at least one prompt token")
        _check_fits(len(ids), limits)  # before looking at each of perhaps a million ids
        for index, token in enumerate(ids):
            if token >= limits.vocab_size:
                raise InvalidRequest(
                    f"token_ids[{index}] = {token} is outside the vocabulary "
                    f"(valid ids are 0..{limits.vocab_size - 1})"
                )
    _check_fits(len(ids), limits)
    return ids


def _check_fits(num_tokens: int, limits: RequestLimits) -> None:
    if num_tokens >= limits.max_model_len:
        raise InvalidRequest(
            f"the prompt has {num_tokens} tokens but the context window is "
            f"{limits.max_model_len} tokens, leaving no room to generate; shorten the prompt"
        )


def max_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for: its longest vocabulary
    entry (byte-level BPE entries spell one character per byte, SentencePiece ones
    their text), so no text longer than max_model_len times this fits the window."""
    if tokenizer not in _token_chars:
        vocab = tokenizer.hf_tokenizer.get_vocab()
        _token_chars[tokenizer] = max(1, max(map(len, vocab), default=1))
    return _token_chars[tokenizer]


def _check_text_fits(
    request: inference_pb2.GenerateRequest, tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    """Refuses, without tokenizing, a text or chat whose characters alone cannot fit."""
    if request.WhichOneof("prompt") == "text":
        num_chars, what = len(request.text), "the prompt text has"
    else:
        messages = request.chat.messages
        # Every message renders to at least one token of the template around it.
        if len(messages) >= limits.max_model_len:
            raise InvalidRequest(
                f"the chat prompt has {len(messages)} messages but the context window is "
                f"{limits.max_model_len} tokens; send fewer messages"
            )
        num_chars = sum(len(m.content) + len(m.role) for m in messages)
        what = "the chat messages have"
    cap = limits.max_model_len * max_token_chars(tokenizer)
    if num_chars > cap:
        raise InvalidRequest(
            f"{what} {num_chars} characters but the context window is "
            f"{limits.max_model_len} tokens, which hold at most {cap} characters of this "
            "model's tokens; shorten the prompt"
        )


def _encode_text(text: str, tokenizer: Tokenizer, limits: RequestLimits) -> list[int]:
    """`tokenizer.encode_text(text)`, tokenizing only the head of a long text first."""
    probe = PROBE_CHARS_PER_TOKEN * limits.max_model_len
    if len(text) > probe:
        head = len(tokenizer.encode_text(text[:probe]))
        if head >= limits.max_model_len + PROBE_SLACK_TOKENS:
            raise InvalidRequest(
                f"the prompt text has {len(text)} characters and its first {probe} alone "
                f"are {head} tokens, but the context window is {limits.max_model_len} "
                "tokens; shorten the prompt"
            )
    return tokenizer.encode_text(text)


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
