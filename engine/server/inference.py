"""`Inference.Generate` over gRPC: a translation onto `GenerationService`, the request
path the HTTP API shares (authentication, admission, adapter resolution, validation
and streaming all live there). A refusal becomes the call's status and sentence
(`engine.server.statuses`); each delivery of outputs becomes one `GenerateResponse`. A
call that goes away (cancelled, deadline, disconnect) leaves the service's block, which
aborts its request at once.
"""

from __future__ import annotations

from engine.request import RequestOutput
from engine.server.generation import GenerationService
from engine.server.responses import generate_response
from engine.server.statuses import translated
from loraplex.bearer import metadata_authorization
from loraplex.v1 import inference_pb2, inference_pb2_grpc


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
    return generate_response(
        out.text, out.token_ids, request_id, adapter_id or "", out.finish_reason or "",
        out.error, out.prompt_tokens, out.completion_tokens,
    )  # fmt: skip
