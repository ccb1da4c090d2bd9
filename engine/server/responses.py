"""`GenerateResponse` messages, built in one place for the engine's own gRPC server
(`inference.py`) and its front-end process (`frontend.py`). Torch-free."""

from __future__ import annotations

from collections.abc import Iterable

from loraplex.v1 import inference_pb2

# FinishReason values (engine.request) -> the wire's enum; a FinishReason is its value.
_FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
    "error": inference_pb2.FINISH_REASON_ERROR,
}


def generate_response(
    text: str,
    token_ids: Iterable[int],
    request_id: str,
    adapter_id: str,
    finish: str = "",
    error: str = "",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> inference_pb2.GenerateResponse:
    """One streamed message; with `finish` (a FinishReason value) the last one, carrying
    the error sentence and the usage."""
    response = inference_pb2.GenerateResponse(
        text=text, token_ids=list(token_ids), request_id=request_id, adapter_id=adapter_id
    )
    if finish:
        response.finish_reason = _FINISH[finish]
        response.error = error
        response.usage.prompt_tokens = prompt_tokens
        response.usage.completion_tokens = completion_tokens
    return response
