"""The one translation between the SDK's inference types and `loraplex.v1` messages,
shared by `Client` and `AsyncClient`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraplex.client.errors import LoraplexError
from loraplex.client.types import ChatMessage, Completion, Delta, FinishReason, Message, Usage
from loraplex.v1 import inference_pb2

_FINISH = {
    inference_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    inference_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    inference_pb2.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    inference_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_SAMPLING = frozenset(
    ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
)


def build_request(
    prompt: str | None,
    messages: Sequence[Message] | None,
    token_ids: Sequence[int] | None,
    adapter: str,
    request_id: str,
    sampling: dict[str, Any],
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest from exactly one of `prompt`, `messages`, `token_ids`.

    Raises ValueError for no prompt or more than one, TypeError for an unknown sampling
    option. An option given as None is left to the engine's default. Values are
    checked by the engine, which names what to fix."""
    given = [
        name
        for name, value in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of prompt, messages or token_ids (got {', '.join(given) or 'none'})"
        )
    unknown = sorted(set(sampling) - _SAMPLING)
    if unknown:
        raise TypeError(
            f"unknown sampling option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_SAMPLING))}"
        )
    request = inference_pb2.GenerateRequest(request_id=request_id, adapter=adapter)
    if prompt is not None:
        request.text = prompt
    elif messages is not None:
        request.chat.SetInParent()  # an empty list still selects the chat prompt
        for message in messages:
            role, content = _role_and_content(message)
            request.chat.messages.add(role=role, content=content)
    else:
        request.token_ids.ids.extend(token_ids or ())
        request.token_ids.SetInParent()
    params = request.sampling
    for name, value in sampling.items():
        if value is None:  # left to the engine's default
            continue
        if name == "stop":
            params.stop.extend([value] if isinstance(value, str) else value)
        else:
            setattr(params, name, value)
    return request


def _role_and_content(message: Message) -> tuple[str, str]:
    if isinstance(message, ChatMessage):
        return message.role, message.content
    try:
        return message["role"], message["content"]
    except (KeyError, TypeError):
        raise ValueError(
            f"a chat message needs a role and content, as ChatMessage(role, content) or "
            f'{{"role": ..., "content": ...}}; got {message!r}'
        ) from None


def to_delta(response: inference_pb2.GenerateResponse) -> Delta:
    finished = response.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
    return Delta(
        text=response.text,
        token_ids=tuple(response.token_ids),
        request_id=response.request_id,
        adapter_id=response.adapter_id,
        finish_reason=_FINISH[response.finish_reason] if finished else None,
        usage=Usage(response.usage.prompt_tokens, response.usage.completion_tokens)
        if finished
        else None,
        error=response.error,
    )


class Joiner:
    """Joins a stream's deltas into one `Completion`."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._ids: list[int] = []
        self._last: Delta | None = None

    def add(self, delta: Delta) -> None:
        self._text.append(delta.text)
        self._ids.extend(delta.token_ids)
        self._last = delta

    def completion(self) -> Completion:
        last = self._last
        if last is None or last.finish_reason is None or last.usage is None:
            raise LoraplexError("the engine ended the stream without saying why it finished")
        return Completion(
            text="".join(self._text),
            token_ids=tuple(self._ids),
            finish_reason=last.finish_reason,
            usage=last.usage,
            request_id=last.request_id,
            adapter_id=last.adapter_id,
            error=last.error,
        )
