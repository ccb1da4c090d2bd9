"""`Inference.Generate` over gRPC: a translation onto `GenerationService`, the request
path the HTTP API shares (authentication, admission, adapter resolution, validation
and streaming all live there). A refusal becomes the call's status and sentence
(`engine.server.statuses`); each delivery of outputs becomes one `GenerateResponse`. A
call that goes away (cancelled, deadline, disconnect) leaves the service's block, which
aborts its request at once.
"""

from __future__ import annotations

from engine.request import FinishReason, RequestOutput
from engine.server.generation import GenerationService
from engine.server.statuses import translated
from loraplex.bearer import metadata_authorization
from loraplex.v1 import inference_pb2, inference_pb2_grpc

_FINISH = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, service: GenerationService) -> None:
        self._service = service

    @translated
    async def Generate(self, request: inference_pb2.GenerateRequest, context):  # noqa: N802
        authorization = metadata_authorization(context.invocation_metadata())
        async with self._service.open(request, authorization, context.peer()) as generation:
            async for out in generation:
                yield _response(out, generation.request_id, generation.adapter_id)


def _response(
    out: RequestOutput, request_id: str, adapter_id: str | None
) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(
        text=out.text,
        token_ids=list(out.token_ids),
        request_id=request_id,
        adapter_id=adapter_id or "",
    )
    if out.finish_reason is not None:
        response.finish_reason = _FINISH[out.finish_reason]
        response.error = out.error
        response.usage.prompt_tokens = out.prompt_tokens
        response.usage.completion_tokens = out.completion_tokens
    return response
