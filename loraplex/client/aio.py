"""`AsyncClient`: `Client` for asyncio, on grpc.aio.

    async with AsyncClient("127.0.0.1:50051", api_key="lpx_...") as client:
        async for delta in client.generate("Hello", adapter="acme/support"):
            print(delta.text, end="", flush=True)

Timeouts, retries and errors follow the contracts in `loraplex.client.inference`.
Cancelling the task that awaits a call (or iterates a stream) cancels the call on the
engine, which frees the request's place at once. Create the client inside the event
loop that uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Unpack

import grpc
import grpc.aio

from loraplex.client.channel import ChannelOptions, bearer, open_aio_channel
from loraplex.client.errors import from_rpc_error
from loraplex.client.retry import Deadline, RetryPolicy, retry_wait_s
from loraplex.client.types import Completion, Delta, Message, SamplingOptions
from loraplex.client.wire import Joiner, build_request, to_delta
from loraplex.v1 import inference_pb2, inference_pb2_grpc


class AsyncClient:
    """An asyncio client of one engine's `Inference` service; `await client.close()`
    (or `async with`) releases the channel."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str = "",
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: ChannelOptions = (),
    ) -> None:
        """The same arguments as `Client`."""
        self._retry = retry or RetryPolicy()
        self._metadata = bearer(api_key)
        self._channel = open_aio_channel(target, self._retry, credentials, channel_options)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        adapter: str = "",
        timeout: float | None = None,
        request_id: str = "",
        **sampling: Unpack[SamplingOptions],
    ) -> AsyncIterator[Delta]:
        """`Client.generate` as an async iterator. Leaving an `async for` early cancels
        the call once the iterator is collected; `await stream.aclose()` (or
        `contextlib.aclosing`) cancels it at once."""
        request = build_request(prompt, messages, token_ids, adapter, request_id, dict(sampling))
        return self._stream(request, timeout)

    async def generate_text(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        adapter: str = "",
        timeout: float | None = None,
        request_id: str = "",
        **sampling: Unpack[SamplingOptions],
    ) -> Completion:
        """Like `generate`, but waits for the end and returns the whole completion."""
        joiner = Joiner()
        stream = self.generate(
            prompt,
            messages=messages,
            token_ids=token_ids,
            adapter=adapter,
            timeout=timeout,
            request_id=request_id,
            **sampling,
        )
        async for delta in stream:
            joiner.add(delta)
        return joiner.completion()

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        adapter: str = "",
        timeout: float | None = None,
        request_id: str = "",
        **sampling: Unpack[SamplingOptions],
    ) -> Completion:
        """The assistant's answer to `messages`; stream it with `generate(messages=...)`."""
        return await self.generate_text(
            messages=messages, adapter=adapter, timeout=timeout, request_id=request_id, **sampling
        )

    async def _stream(
        self, request: inference_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[Delta]:
        deadline = Deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.Generate(
                request, metadata=self._metadata, timeout=deadline.remaining_s()
            )
            received = False
            try:
                async for response in call:
                    received = True
                    yield to_delta(response)
                return
            except grpc.RpcError as exc:
                wait_s = retry_wait_s(self._retry, attempt, exc.code(), received, deadline)
                if wait_s is None:
                    raise from_rpc_error(exc) from exc
            finally:
                call.cancel()  # the task was cancelled or the iterator closed; else a no-op
            await asyncio.sleep(wait_s)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
