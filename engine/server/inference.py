"""`Inference.Generate`: authenticate, resolve the adapter, validate, stream.

The walk of one request: the key names a tenant (checked locally, no database); the
adapter name resolves to a loaded adapter of that tenant; the prompt and sampling
values are validated and tokenized; the engine loop streams `RequestOutput`s back
through an asyncio queue. A client that goes away aborts its request at once.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc

from engine.engine import Engine
from engine.lora.errors import AdapterEvictingError, AdapterNotFoundError
from engine.lora.registry import AdapterRegistry
from engine.request import FinishReason, RequestOutput
from engine.server.auth import ApiKeyTable, AuthError
from engine.server.validation import InvalidRequest, RequestLimits, to_engine_request
from engine.tokenizer import Tokenizer
from loraplex.v1 import inference_pb2, inference_pb2_grpc

_FINISH = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        limits: RequestLimits,
        adapters: AdapterRegistry,
        keys: ApiKeyTable,
    ) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._limits = limits
        self._adapters = adapters
        self._keys = keys

    async def Generate(self, request: inference_pb2.GenerateRequest, context):  # noqa: N802
        tenant = await self._authenticate(context)
        adapter_id = await self._resolve_adapter(request.adapter, tenant, context)
        request_id = request.request_id or uuid.uuid4().hex
        try:
            engine_request = to_engine_request(
                request, request_id, self._tokenizer, self._limits, adapter_id, tenant or ""
            )
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if adapter_id is not None:
            try:
                self._adapters.acquire(adapter_id)  # released by the engine loop at the end
            except (AdapterNotFoundError, AdapterEvictingError) as exc:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._engine.submit(
            engine_request, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out)
        )
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finish_reason is not None
                yield self._response(out, request_id, adapter_id)
        finally:
            if not finished:  # the client cancelled or disconnected
                self._engine.abort(request_id)

    async def _authenticate(self, context) -> str | None:
        header = dict(context.invocation_metadata()).get("authorization")
        try:  # the first use of a key runs a slow hash: keep it off the event loop
            return await asyncio.to_thread(self._keys.authenticate, header)
        except AuthError as exc:
            await context.abort(exc.code, str(exc))

    async def _resolve_adapter(self, name: str, tenant: str | None, context) -> str | None:
        if not name:
            return None
        try:
            record = self._adapters.resolve(name)
        except AdapterNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{exc}; check the name")
        except AdapterEvictingError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"adapter {name!r} is being evicted from this engine and takes no new requests",
            )
        if tenant is not None and record.tenant and record.tenant != tenant:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"adapter {name!r} belongs to another tenant; your key may use only "
                f"tenant {tenant!r}'s adapters and the base model",
            )
        return record.adapter_id

    @staticmethod
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
            response.usage.prompt_tokens = out.prompt_tokens
            response.usage.completion_tokens = out.completion_tokens
        return response
