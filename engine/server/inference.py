"""`Inference.Generate`: authenticate, resolve the adapter, validate, stream.

The walk of one request: the key names a tenant (checked locally, no database); the
adapter name resolves to a loaded adapter of that tenant; the prompt and sampling
values are validated and tokenized; the engine loop streams `RequestOutput`s back
through `engine.server.streams` (one wake-up per engine step, however many streams).
A client that goes away aborts its request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from typing import NoReturn

import grpc

from engine.engine import Engine
from engine.lora.errors import (
    AdapterEvictingError,
    AdapterFormatError,
    AdapterLoadingError,
    AdapterNotFoundError,
)
from engine.lora.registry import AdapterRecord, AdapterRegistry
from engine.metrics import EngineMetrics, RequestTimer
from engine.request import EngineRequest, FinishReason, RequestOutput
from engine.server.auth import ApiKeyTable, AuthError
from engine.server.streams import OutputMailbox, OutputStream, merge
from engine.server.validation import InvalidRequest, RequestLimits, to_engine_request
from engine.tokenizer import Tokenizer
from loraplex.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

_FINISH = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}
_LOADING_POLL_S = 0.02  # how often a request waiting for a preloading adapter looks again


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        limits: RequestLimits,
        adapters: AdapterRegistry,
        keys: ApiKeyTable,
        metrics: EngineMetrics | None = None,  # default: the engine's
        max_waiting: int = 1024,
        adapter_wait_s: float = 30.0,  # for an adapter still being preloaded
        max_tenant_requests: int = 256,  # in flight (queued or running) per tenant key
    ) -> None:
        self._max_waiting = max_waiting
        self._max_tenant_requests = max_tenant_requests
        self._tenant_requests: Counter[str] = Counter()  # calls in flight per tenant
        self.num_in_flight = 0  # Generate calls past admission, not yet finished
        self._draining = False
        self._adapter_wait_s = adapter_wait_s
        self._mailbox: OutputMailbox | None = None  # bound to the asyncio loop on first use
        self._admitting = 0  # calls past the queue check, not yet submitted
        self._engine = engine
        self._tokenizer = tokenizer
        self._limits = limits
        self._adapters = adapters
        self._keys = keys
        self._metrics = metrics if metrics is not None else engine.metrics

    def start_draining(self) -> None:
        """Shutting down: new calls get UNAVAILABLE, calls in flight go on."""
        self._draining = True

    async def Generate(self, request: inference_pb2.GenerateRequest, context):  # noqa: N802
        timer = self._metrics.request_timer()
        if self._draining:
            await self._refuse(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "this engine is shutting down; retry on another engine",
            )
        if not self._engine.is_alive():
            await self._refuse(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "this engine's loop has stopped; use another engine",
            )
        tenant = await self._authenticate(context)
        if tenant is not None and self._tenant_requests[tenant] >= self._max_tenant_requests:
            # One tenant's burst must not fill the queue every tenant shares.
            await self._refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tenant {tenant!r} already has {self._max_tenant_requests} requests in flight "
                "on this engine; retry when some have finished",
            )
        # Calls still being prepared count against the cap too, so a burst cannot slip
        # past it before any of them reaches the queue.
        if self._engine.num_queued + self._admitting >= self._max_waiting:
            await self._refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._max_waiting} requests are already waiting on this engine; "
                "retry later or on another engine",
            )
        self.num_in_flight += 1
        if tenant is not None:
            self._tenant_requests[tenant] += 1
        try:
            # aclosing: a call that goes away closes the inner stream now (its abort runs
            # within a step), not whenever the generator happens to be collected.
            async with contextlib.aclosing(self._stream(request, tenant, context, timer)) as out:
                async for response in out:
                    yield response
        finally:
            self.num_in_flight -= 1
            if tenant is not None:
                self._tenant_requests[tenant] -= 1

    async def _stream(self, request: inference_pb2.GenerateRequest, tenant: str | None,
                      context, timer: RequestTimer):  # fmt: skip
        """Prepares the call, submits it to the engine loop and yields its responses;
        a call that goes away before its last response aborts its request."""
        self._admitting += 1
        try:
            engine_request, request_id = await self._prepare(request, tenant, context)
            if self._mailbox is None:
                self._mailbox = OutputMailbox(asyncio.get_running_loop())
            outputs = OutputStream()
            self._engine.submit(engine_request, self._mailbox.sender(outputs))
        finally:
            self._admitting -= 1
        finished = False
        try:
            while not finished:
                batch = await outputs.next_batch()
                for out in batch:
                    timer.on_output(out)
                finished = batch[-1].finish_reason is not None
                # A stream that fell behind catches up in one message, not one per token.
                yield self._response(merge(batch), request_id, engine_request.adapter_id)
        finally:
            if not finished:  # the client cancelled or disconnected
                self._engine.abort(engine_request.request_id)

    async def _prepare(
        self, request: inference_pb2.GenerateRequest, tenant: str | None, context
    ) -> tuple[EngineRequest, str]:
        """Resolves the adapter, validates and tokenizes; returns the engine's request and
        the request_id to echo. Refuses (raises) whatever the caller got wrong."""
        adapter_id = await self._resolve_adapter(request.adapter, tenant, context)
        # The engine's own id: a client's request_id is echoed, never trusted as a key.
        engine_id = uuid.uuid4().hex
        try:  # tokenizing a long prompt or rendering a template must not stall the loop
            engine_request = await asyncio.to_thread(
                to_engine_request,
                request,
                engine_id,
                self._tokenizer,
                self._limits,
                adapter_id,
                tenant or "",
            )
        except InvalidRequest as exc:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if adapter_id is not None:
            await self._acquire_adapter(adapter_id, context)
        return engine_request, request.request_id or engine_id

    async def _acquire_adapter(self, adapter_id: str, context) -> None:
        """Counts the request on its adapter (the engine loop releases it at the end) and
        brings the weights into host memory here, where they stay while the request is
        in flight, so the loop never reads a disk."""
        try:
            record = self._adapters.acquire(adapter_id)
        except (AdapterNotFoundError, AdapterEvictingError) as exc:
            await self._refuse(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except AdapterLoadingError as exc:  # evicted and announced again meanwhile
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, f"{exc}; retry shortly")
        if record.in_cpu_cache:
            return  # and it stays there now that this request holds it
        try:
            await asyncio.to_thread(self._adapters.weights, adapter_id)
        except (AdapterFormatError, OSError):
            self._adapters.release(adapter_id)
            # The reason names server paths: it goes to the log, not to the caller.
            log.exception("adapter %s could not be read", adapter_id)
            await self._refuse(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"adapter {adapter_id!r} cannot be read from this engine's disk; "
                "retry on another engine",
            )
        except BaseException:  # cancelled before the engine loop owns the request
            self._adapters.release(adapter_id)
            raise

    async def _authenticate(self, context) -> str | None:
        if not self._keys.enforcing:
            return None
        header = dict(context.invocation_metadata()).get("authorization")
        try:  # the first use of a key runs a slow hash: keep it off the event loop
            return await asyncio.to_thread(self._keys.authenticate, header)
        except AuthError as exc:
            await self._refuse(context, exc.code, str(exc))

    async def _resolve_adapter(self, name: str, tenant: str | None, context) -> str | None:
        """The id of the adapter `name` names for this caller. With an API key, another
        tenant's adapter, a missing one and an evicted one get the same sentence: a
        tenant must not learn what other tenants have or had."""
        if not name:
            return None
        unknown = (
            f"adapter {name!r} is not available to tenant {tenant!r} on this engine; check "
            "the name, or ask the control plane's ResolveAdapter where it is served"
        )
        try:
            record = await self._resolve_when_loaded(name, context)
        except AdapterNotFoundError as exc:
            await self._refuse(
                context, grpc.StatusCode.NOT_FOUND, unknown if tenant else f"{exc}; check the name"
            )
        except AdapterEvictingError:
            evicting = f"adapter {name!r} is being evicted from this engine (no new requests)"
            await self._refuse(context, grpc.StatusCode.NOT_FOUND, unknown if tenant else evicting)
        # With keys, an adapter without a tenant (loaded from --adapter-dir) is nobody's.
        if tenant is not None and record.tenant != tenant:
            await self._refuse(context, grpc.StatusCode.NOT_FOUND, unknown)
        return record.adapter_id

    async def _resolve_when_loaded(self, name: str, context) -> AdapterRecord:
        """`resolve(name)`, waiting while the adapter is still being preloaded: up to
        `adapter_wait_s`, then the call is refused as UNAVAILABLE (retry)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._adapter_wait_s
        while True:
            try:
                return self._adapters.resolve(name)
            except AdapterLoadingError as exc:
                if loop.time() >= deadline:
                    await self._refuse(
                        context, grpc.StatusCode.UNAVAILABLE, f"{exc}; retry in a few seconds"
                    )
            await asyncio.sleep(_LOADING_POLL_S)

    async def _refuse(self, context, code: grpc.StatusCode, message: str) -> NoReturn:
        """Counts the refusal, then aborts the call (raises)."""
        self._metrics.request_refused(code)
        await context.abort(code, message)

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
            response.error = out.error
            response.usage.prompt_tokens = out.prompt_tokens
            response.usage.completion_tokens = out.completion_tokens
        return response
