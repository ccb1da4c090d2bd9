"""OpenAI request bodies in, `GenerateRequest`s out; engine outputs in, OpenAI JSON out.

Only the shape is checked here (types, which fields exist, what this engine cannot
honour); the values go on to the same validation as a gRPC request, so a
temperature or a prompt is refused with the same sentence on both APIs.

Tolerated and ignored, as popular clients send them: unknown fields, `user`,
`stream_options` without `stream`, and fields at their no-op value (`n: 1`,
`presence_penalty: 0`, `logprobs: false`, ...). Refused with 400: what would silently
change the answer if ignored (`n > 1`, penalties, logprobs, tools, `echo`, ...).
Beside OpenAI's fields, vLLM's `top_k` (-1 or 0 = off) and `ignore_eos` are honoured.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import grpc

from engine.request import FinishReason, RequestOutput
from engine.server.statuses import Refused
from loraplex.v1 import inference_pb2

_MAX_UINT32 = 2**32 - 1
_MAX_UINT64 = 2**64 - 1
_MAX_STOP = 4  # OpenAI's limit on stop sequences
# Fields whose use this engine cannot honour, with the values that mean "not used".
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
}
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


@dataclass(frozen=True)
class ParsedCall:
    """One OpenAI call: the engine request and how to answer it."""

    request: inference_pb2.GenerateRequest
    model: str  # echoed in every answer, as the caller spelled it
    stream: bool
    include_usage: bool  # streaming: a last chunk with the usage


def invalid(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse_chat(body: Any, base_model: str) -> ParsedCall:
    """A `POST /v1/chat/completions` body; raises Refused (INVALID_ARGUMENT)."""
    body = _object(body)
    request = _common(body, base_model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{index}] must be an object with a string 'role'")
        request.chat.messages.add(role=message["role"], content=_content(message, index))
    tokens = body.get("max_completion_tokens")
    _sampling(body, request, body.get("max_tokens") if tokens is None else tokens)
    return _call(body, request)


def parse_completion(body: Any, base_model: str) -> ParsedCall:
    """A `POST /v1/completions` body; raises Refused (INVALID_ARGUMENT)."""
    body = _object(body)
    request = _common(body, base_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.text = prompt
    elif (
        isinstance(prompt, list)
        and prompt
        and all(_is_int(t) and 0 <= t <= _MAX_UINT32 for t in prompt)
    ):
        request.token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise invalid("'prompt' holds several prompts; this engine takes one per request")
    else:
        raise invalid("'prompt' must be a string or a non-empty list of token ids")
    _sampling(body, request, body.get("max_tokens"))
    return _call(body, request)


def completion_body(
    call: ParsedCall, chat: bool, request_id: str, text: str, out: RequestOutput
) -> dict[str, Any]:
    """The non-streaming answer: the whole text and the usage."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": _FINISH.get(out.finish_reason)}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    return {
        **_envelope(call, chat, request_id, stream=False),
        "choices": [choice],
        "usage": usage(out),
    }


def chunk_body(
    call: ParsedCall,
    chat: bool,
    request_id: str,
    text: str,
    finish: FinishReason | None,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chunk: a text delta, and the finish reason on the last one."""
    choice: dict[str, Any] = {"index": 0}
    if chat:
        if first:
            choice["delta"] = {"role": "assistant", "content": text}
        else:
            choice["delta"] = {"content": text} if text else {}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = _FINISH.get(finish) if finish is not None else None
    body = {**_envelope(call, chat, request_id, stream=True), "choices": [choice]}
    if call.include_usage:
        body["usage"] = None  # as OpenAI does: only the extra last chunk carries it
    return body


def usage_chunk_body(
    call: ParsedCall, chat: bool, request_id: str, out: RequestOutput
) -> dict[str, Any]:
    return {**_envelope(call, chat, request_id, stream=True), "choices": [], "usage": usage(out)}


def usage(out: RequestOutput) -> dict[str, int]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }


def _envelope(call: ParsedCall, chat: bool, request_id: str, stream: bool) -> dict[str, Any]:
    if chat:
        kind = "chat.completion.chunk" if stream else "chat.completion"
        prefix = "chatcmpl-"
    else:
        kind, prefix = "text_completion", "cmpl-"
    return {
        "id": prefix + request_id,
        "object": kind,
        "created": int(time.time()),
        "model": call.model,
    }


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    for name, unused in _UNSUPPORTED.items():
        if name in body and not any(body[name] == value for value in unused):
            raise invalid(f"'{name}' is not supported by this engine; leave it out")
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid(f"'n' is {n!r}; this engine returns one choice per request (n=1)")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise invalid('\'response_format\' other than {"type": "text"} is not supported')
    return body


def _common(body: dict[str, Any], base_model: str) -> inference_pb2.GenerateRequest:
    """The adapter `model` names: the base model's name means no adapter; anything else
    is an adapter name (`tenant/name` or `tenant/name@version`), resolved as on gRPC."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid(
            f"'model' is required: {base_model!r} for the base model, or an adapter's "
            "'tenant/name' (GET /v1/models lists them)"
        )
    return inference_pb2.GenerateRequest(adapter="" if model == base_model else model)


def _call(body: dict[str, Any], request: inference_pb2.GenerateRequest) -> ParsedCall:
    stream = _optional(body, "stream", bool, False)
    options = body.get("stream_options")
    include_usage = False
    if stream and options is not None:
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object, e.g. {\"include_usage\": true}")
        include_usage = _optional(options, "include_usage", bool, False)
    return ParsedCall(request, body["model"], stream, include_usage)


def _content(message: dict[str, Any], index: int) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"messages[{index}].content: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise invalid(f"messages[{index}].content: a text part needs a string 'text'")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"messages[{index}].content must be a string or a list of text parts")


def _sampling(body: dict[str, Any], request: inference_pb2.GenerateRequest, tokens: Any) -> None:
    s = request.sampling
    if tokens is not None:
        if not _is_int(tokens) or not 1 <= tokens <= _MAX_UINT32:
            raise invalid(f"max_tokens is {tokens!r}; it must be a positive integer")
        s.max_new_tokens = tokens
    # OpenAI's defaults: temperature 1 and top_p 1 when the caller leaves them out.
    s.temperature = _number(body, "temperature", 1.0)
    s.top_p = _number(body, "top_p", 1.0)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed <= _MAX_UINT64:
            raise invalid(f"seed is {seed!r}; it must be an integer between 0 and 2**64 - 1")
        s.seed = seed
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or not -1 <= top_k <= _MAX_UINT32:
            raise invalid(f"top_k is {top_k!r}; it must be -1 or 0 (off) or a positive integer")
        s.top_k = max(0, top_k)
    s.ignore_eos = _optional(body, "ignore_eos", bool, False)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise invalid("'stop' must be a string or a list of strings")
        if len(stop) > _MAX_STOP:
            raise invalid(f"'stop' has {len(stop)} strings; send at most {_MAX_STOP}")
        s.stop.extend(stop)


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(f"'{name}' must be a number, got {value!r}")
    return float(value)


def _optional(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise invalid(f"'{name}' must be a {kind.__name__}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
