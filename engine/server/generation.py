"""The one request path every front end shares: gRPC `Inference.Generate` and the
OpenAI-compatible HTTP API both call `GenerationService.open`.

The walk of one request: the engine must be serving (not draining, its loop alive);
the key names a tenant (checked locally, no database); the tenant's and the engine's
admission caps hold; the adapter name resolves to a loaded adapter of that tenant; the
prompt and sampling values are validated and tokenized; the engine loop streams
`RequestOutput`s back through `engine.server.streams` (one wake-up per engine step,
however many streams). Whatever the caller got wrong raises `Refused` with a gRPC
status code and a sentence, built from the one table of `engine.server.statuses` where
an error of the adapter layer is the cause; each front end translates it (gRPC aborts
with it, HTTP maps its code to an HTTP status). A caller that goes away aborts its
request within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc

from engine.engine import EngineLoop
from engine.formats.errors import AdapterFormatError
from engine.lora.errors import (
    AdapterEvictingError,
    AdapterLoadingError,
    AdapterNotFoundError,
)
from engine.lora.registry import AdapterRegistry, LoadedAdapter
from engine.metrics import EngineMetrics, RequestTimer
from engine.request import RequestOutput
from engine.server.auth import ApiKeyTable, AuthError
from engine.server.statuses import Refused, status_of
from engine.server.streams import OutputMailbox, OutputStream, merge
from engine.server.validation import InvalidRequest, RequestLimits, to_engine_request
from engine.tokenizer import Tokenizer
from loraplex.v1 import inference_pb2

log = logging.getLogger(__name__)

_LOADING_POLL_S = 0.02  # how often a request waiting for a preloading adapter looks again


class Generation:
    """The outputs of one admitted request. Iterating yields one merged `RequestOutput`
    per delivery (a reader that fell behind catches up at once); the last one carries
    the finish reason, and iteration ends after it."""

    def __init__(
        self,
        outputs: OutputStream,
        timer: RequestTimer,
        request_id: str,
        adapter_id: str | None,
        prompt_tokens: int,
    ) -> None:
        self.request_id = request_id  # the caller's request_id if it sent one, else the engine's
        self.adapter_id = adapter_id  # resolved id; None = the base model
        self.prompt_tokens = prompt_tokens
        self.finished = False
        self._outputs = outputs
        self._timer = timer

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        batch = await self._outputs.next_batch()
        for out in batch:
            self._timer.on_output(out)
        self.finished = batch[-1].finish_reason is not None
        return merge(batch)

    async def forward(self, send: Callable[[RequestOutput], None]) -> None:
        """Hands every output to `send` as it is delivered, until the last: for a
        relay, this costs no task wake-up per output as iterating does (at 242 streams,
        242 a step on the loop the engine shares the GIL with). Cancelling it stops
        the handing over; outputs after that are dropped."""
        if self.finished:
            return
        last: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_output(out: RequestOutput) -> None:
            if last.done():
                return
            try:
                self._timer.on_output(out)
                send(out)
            except Exception as exc:  # fails this call, not the delivery to the others
                last.set_exception(exc)
                return
            if out.finish_reason is not None:
                self.finished = True
                last.set_result(None)

        self._outputs.consume(on_output)
        try:
            await last
        finally:
            last.cancel()  # no-op once it finished


class GenerationService:
    """Admission, authentication, adapter resolution, validation and streaming of
    generate calls, for every front end. Runs on one asyncio loop."""

    def __init__(
        self,
        engine: EngineLoop,
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
        self.num_in_flight = 0  # calls past admission, not yet finished
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
        """Shutting down: new calls are refused UNAVAILABLE, calls in flight go on."""
        self._draining = True

    def refused(self, exc: Refused) -> None:
        """Counts a refusal a front end made itself (e.g. a body it could not parse)."""
        self._metrics.request_refused(exc.code)

    @contextlib.asynccontextmanager
    async def open(
        self, request: inference_pb2.GenerateRequest, authorization: str | None, peer: str = ""
    ) -> AsyncIterator[Generation]:
        """Admits `request` and submits it to the engine loop; the block iterates the
        `Generation`. Raises `Refused` before the block runs for anything the caller got
        wrong or any admission limit. Leaving the block before the last output (an error,
        a cancelled task, a client gone) aborts the request within a step."""
        timer = self._metrics.request_timer()
        if self._draining:
            self._refuse(
                grpc.StatusCode.UNAVAILABLE,
                "this engine is shutting down; retry on another engine",
            )
        if not self._engine.is_alive():
            self._refuse(
                grpc.StatusCode.UNAVAILABLE, "this engine's loop has stopped; use another engine"
            )
        tenant = await self.authenticate(authorization, peer)
        if tenant is not None and self._tenant_requests[tenant] >= self._max_tenant_requests:
            # One tenant's burst must not fill the queue every tenant shares.
            self._refuse(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tenant {tenant!r} already has {self._max_tenant_requests} requests in flight "
                "on this engine; retry when some have finished",
            )
        # Calls still being prepared count against the cap too, so a burst cannot slip
        # past it before any of them reaches the queue.
        if self._engine.num_queued + self._admitting >= self._max_waiting:
            self._refuse(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._max_waiting} requests are already waiting on this engine; "
                "retry later or on another engine",
            )
        self.num_in_flight += 1
        if tenant is not None:
            self._tenant_requests[tenant] += 1
        try:
            self._admitting += 1
            try:
                generation, engine_id = await self._submit(request, tenant, timer)
            finally:
                self._admitting -= 1
            try:
                yield generation
            finally:
                if not generation.finished:  # the caller cancelled, failed or went away
                    self._engine.abort(engine_id)
        finally:
            self.num_in_flight -= 1
            if tenant is not None:
                self._tenant_requests[tenant] -= 1

    async def authenticate(self, authorization: str | None, peer: str = "") -> str | None:
        """The tenant of the presented `Bearer <key>` value; None when keys are not
        enforced. Refuses (UNAUTHENTICATED) a missing, malformed or unknown key, and
        callers past the key table's limits (`peer`: the caller's address, a gRPC peer
        string or an HTTP client's IP, for those)."""
        if not self._keys.enforcing:
            return None
        try:  # a key's first use runs scrypt on the key table's own bounded pool
            return await self._keys.authenticate_async(authorization, peer)
        except AuthError as exc:
            self._refuse_for(exc)

    def usable_adapters(self, tenant: str | None) -> list[LoadedAdapter]:
        """The loaded adapters a caller of `tenant` may name (None: keys not enforced,
        every adapter), leaving out those being evicted."""
        return [
            record
            for record in self._adapters.list()
            if not record.evicting and (tenant is None or record.tenant == tenant)
        ]

    async def _submit(
        self, request: inference_pb2.GenerateRequest, tenant: str | None, timer: RequestTimer
    ) -> tuple[Generation, str]:
        """Resolves, validates and tokenizes, then hands the request to the engine loop.
        Returns its `Generation` and the engine's request id."""
        adapter_id = await self._resolve_adapter(request.adapter, tenant)
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
            self._refuse_for(exc)
        if adapter_id is not None:
            await self._acquire_adapter(adapter_id)
        # No await from here to submit: a cancel cannot strand the acquired adapter.
        if self._mailbox is None:
            self._mailbox = OutputMailbox(asyncio.get_running_loop())
        outputs = OutputStream()
        self._engine.submit(engine_request, self._mailbox.sender(outputs))
        generation = Generation(
            outputs,
            timer,
            request.request_id or engine_id,
            adapter_id,
            len(engine_request.prompt_token_ids),
        )
        return generation, engine_id

    async def _acquire_adapter(self, adapter_id: str) -> None:
        """Counts the request on its adapter (the engine loop releases it at the end) and
        brings the weights into host memory here, where they stay while the request is
        in flight, so the loop never reads a disk."""
        try:  # the caller's own adapter (resolved): what happened to it may be told
            record = self._adapters.acquire(adapter_id)
        except (AdapterNotFoundError, AdapterEvictingError, AdapterLoadingError) as exc:
            self._refuse_for(exc)
        if record.in_cpu_cache:
            return  # and it stays there now that this request holds it
        try:
            await asyncio.to_thread(self._adapters.weights, adapter_id)
        except (AdapterFormatError, OSError):
            self._adapters.release(adapter_id)
            # Not the caller's input but this engine's copy of an adapter it accepted:
            # another engine may serve it. The reason names server paths: it goes to
            # the log, not to the caller.
            log.exception("adapter %s could not be read", adapter_id)
            self._refuse(
                grpc.StatusCode.UNAVAILABLE,
                f"adapter {adapter_id!r} cannot be read from this engine's disk; "
                "retry on another engine",
            )
        except BaseException:  # cancelled before the engine loop owns the request
            self._adapters.release(adapter_id)
            raise

    async def _resolve_adapter(self, name: str, tenant: str | None) -> str | None:
        """The id of the adapter `name` names for this caller. With an API key, another
        tenant's adapter, a missing one and an evicted one get the same sentence: a
        tenant must not learn what other tenants have or had. Its own adapter being
        evicted is UNAVAILABLE, as without a key: retry on another engine."""
        if not name:
            return None
        unknown = (
            f"adapter {name!r} is not available to tenant {tenant!r} on this engine; check "
            "the name, or ask the control plane's ResolveAdapter where it is served"
        )
        try:
            # Only --adapter-dir adapters preload, and they have no tenant: a keyed
            # caller waiting for one would learn that it exists, and could never use it.
            record = await self._resolve_when_loaded(name, wait=tenant is None)
        except AdapterNotFoundError as exc:
            if tenant is not None:
                self._refuse(grpc.StatusCode.NOT_FOUND, unknown)
            self._refuse_for(exc)
        except AdapterEvictingError as exc:
            if tenant is not None and self._tenant_of(name) != tenant:
                self._refuse(grpc.StatusCode.NOT_FOUND, unknown)
            self._refuse_for(exc)
        # With keys, an adapter without a tenant (loaded from --adapter-dir) is nobody's.
        if tenant is not None and record.tenant != tenant:
            self._refuse(grpc.StatusCode.NOT_FOUND, unknown)
        return record.adapter_id

    async def _resolve_when_loaded(self, name: str, wait: bool) -> LoadedAdapter:
        """`resolve(name)`, waiting while the adapter is still being preloaded: up to
        `adapter_wait_s`, then the call is refused as UNAVAILABLE (retry). Without
        `wait`, an adapter still preloading is AdapterNotFoundError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._adapter_wait_s
        while True:
            try:
                return self._adapters.resolve(name)
            except AdapterLoadingError as exc:
                if not wait:
                    raise AdapterNotFoundError(str(exc)) from exc
                if loop.time() >= deadline:
                    self._refuse_for(exc)
            await asyncio.sleep(_LOADING_POLL_S)

    def _tenant_of(self, name: str) -> str | None:
        """The tenant of the loaded adapter with id or alias `name`, evicting ones too."""
        for record in self._adapters.list():
            if name == record.adapter_id or name in record.aliases:
                return record.tenant
        return None

    def _refuse(self, code: grpc.StatusCode, message: str) -> NoReturn:
        """Counts the refusal, then raises it."""
        self._metrics.request_refused(code)
        raise Refused(code, message)

    def _refuse_for(self, exc: Exception) -> NoReturn:
        """Refuses with the status the table gives `exc` (a class not in it is a bug and
        propagates)."""
        status = status_of(exc)
        if status is None:
            raise exc
        self._refuse(*status)
