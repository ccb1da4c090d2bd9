"""The OpenAI-compatible HTTP API of an engine (`--http-port`), with its probes.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (server-sent events ending
with `data: [DONE]` when `stream` is set, one JSON answer otherwise), `GET /v1/models`
(the base model and the adapters the caller's key may name, each adapter with
`parent` = the base model), `GET /health` (liveness), `GET /ready` (readiness) and
`GET /metrics` (the same registry as `--metrics-port`, for scrapers that read the
serving port, as inference gateways do by default).

A thin translation: the body becomes a `GenerateRequest` (`openai_schema`) and goes
through `GenerationService.open`, the path gRPC calls take, so keys, tenant rules,
admission caps, adapter resolution and validation are the same code; refusals leave
with the gRPC status of the engine's one table, mapped to HTTP (`openai_errors`).

Why aiohttp: it runs on the engine's existing asyncio loop beside grpc.aio (the
service and its output mailbox are bound to that one loop), with no second server
process or framework owning the loop and the signals as an ASGI server (uvicorn)
would; it is mature and maintained by aio-libs, streams responses with back-pressure,
and cancels a handler whose client disconnects (`handler_cancellation`), which aborts
the generation within a step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from engine.request import FinishReason, RequestOutput
from engine.server.generation import Generation, GenerationService
from engine.server.openai_errors import error_body, openai_errors
from engine.server.openai_schema import (
    ParsedCall,
    chunk_body,
    completion_body,
    invalid,
    parse_chat,
    parse_completion,
    usage_chunk_body,
)
from engine.server.probes import ServingState
from engine.server.statuses import Refused

MAX_BODY_BYTES = 32 * 1024 * 1024  # a long chat history in JSON; the context window bounds it
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must pass each event on at once
}
_FAILED = (FinishReason.ERROR, FinishReason.CANCELLED)
Parser = Callable[[Any, str], ParsedCall]


class HttpApi:
    """Serves the routes above on one host:port of the running asyncio loop."""

    def __init__(
        self,
        service: GenerationService,
        state: ServingState,
        base_model: str,
        registry: CollectorRegistry,
    ) -> None:
        self._service = service
        self._state = state
        self._base_model = base_model
        self._registry = registry
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[openai_errors])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        self.app = app

    async def start(self, host: str, port: int) -> int:
        """Binds host:port (OSError if taken) and serves; returns the bound port."""
        # The drain already gave streams their grace: on stop, what is left is cut.
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- generation ----------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat, chat=True)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion, chat=False)

    async def _generate(
        self, http_request: web.Request, parse: Parser, chat: bool
    ) -> web.StreamResponse:
        authorization = http_request.headers.get("Authorization")
        peer = http_request.remote or ""
        try:
            call = parse(await _json(http_request), self._base_model)
        except Refused as exc:
            # As on gRPC, credentials are judged before the request: a bad key hears 401.
            await self._service.authenticate(authorization, peer)
            self._service.refused(exc)
            raise
        try:
            async with self._service.open(call.request, authorization, peer) as generation:
                if call.stream:
                    return await self._stream(http_request, call, chat, generation)
                return await _collect(call, chat, generation)
        except Refused as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            hint = f"{exc.message} (the base model is {self._base_model!r})"
            raise Refused(exc.code, hint) from None

    async def _stream(
        self, http_request: web.Request, call: ParsedCall, chat: bool, generation: Generation
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(http_request)
        request_id = generation.request_id
        try:
            if chat:  # OpenAI opens a chat stream with the assistant's role
                await _send(response, chunk_body(call, True, request_id, "", None, first=True))
            async for out in generation:
                if out.finish_reason in _FAILED:
                    await _send(response, error_body(grpc.StatusCode.UNAVAILABLE, _failure(out))[1])
                    break
                if out.text or out.finish_reason is not None:
                    body = chunk_body(call, chat, request_id, out.text, out.finish_reason)
                    await _send(response, body)
                if out.finish_reason is not None and call.include_usage:
                    await _send(response, usage_chunk_body(call, chat, request_id, out))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left: leaving the service's block aborts the request
        return response

    # -- models --------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        entries = await self._model_entries(request)
        return web.json_response({"object": "list", "data": entries})

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for entry in await self._model_entries(request):
            if entry["id"] == name:
                return web.json_response(entry)
        raise Refused(
            grpc.StatusCode.NOT_FOUND,
            f"model {name!r} is not served to this key here; GET /v1/models lists what is",
        )

    async def _model_entries(self, request: web.Request) -> list[dict[str, Any]]:
        """The base model, then every name (id and aliases) of each usable adapter."""
        tenant = await self._service.authenticate(
            request.headers.get("Authorization"), request.remote or ""
        )
        base = self._base_model
        entries = [_model_entry(base, self._created, "loraplex", base, None)]
        for record in self._service.usable_adapters(tenant):
            created = int(record.loaded_at.timestamp())
            owner = record.tenant or "loraplex"
            for name in (record.adapter_id, *record.aliases):
                entries.append(_model_entry(name, created, owner, record.adapter_id, base))
        return entries

    # -- probes and metrics --------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return _probe(*self._state.liveness())

    async def _ready(self, request: web.Request) -> web.Response:
        return _probe(*self._state.readiness())

    async def _metrics(self, request: web.Request) -> web.Response:
        text = await asyncio.to_thread(generate_latest, self._registry)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _collect(call: ParsedCall, chat: bool, generation: Generation) -> web.Response:
    texts: list[str] = []
    last: RequestOutput | None = None
    async for out in generation:
        texts.append(out.text)
        last = out
    assert last is not None  # a generation always ends with a finishing output
    if last.finish_reason in _FAILED:
        raise Refused(grpc.StatusCode.UNAVAILABLE, _failure(last))
    return web.json_response(
        completion_body(call, chat, generation.request_id, "".join(texts), last)
    )


def _failure(out: RequestOutput) -> str:
    if out.error:
        return f"{out.error}; retry"
    return "the engine cancelled this request (shutting down, or its adapter was evicted); retry"


async def _json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON ({exc})") from None


async def _send(response: web.StreamResponse, body: dict[str, Any]) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    await response.write(b"data: " + data.encode() + b"\n\n")


def _model_entry(
    name: str, created: int, owner: str, root: str, parent: str | None
) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owner,
            "root": root, "parent": parent}  # fmt: skip


def _probe(ok: bool, why: str) -> web.Response:
    return web.json_response({"status": why}, status=200 if ok else 503)
