"""`Client`: generate text on an engine over gRPC, blocking (threads welcome).

    with Client("127.0.0.1:50051", api_key="lpx_...") as client:
        for delta in client.generate("Hello", adapter="acme/support", max_new_tokens=32):
            print(delta.text, end="", flush=True)

Contracts shared with `AsyncClient`:
- `timeout` (seconds) bounds the whole call, retries and their waits included; past it
  the call raises `DeadlineExceededError`.
- UNAVAILABLE is retried with exponential backoff (`RetryPolicy`) until the first
  response arrives; after that it is raised, never retried (the caller has seen text).
- A refusal raises the `LoraplexError` subclass of its status, with the server's
  sentence. A generation the engine itself failed is not raised: it ends with
  `finish_reason == FinishReason.ERROR` and the sentence in `error`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Unpack

import grpc

from loraplex.client.channel import ChannelOptions, bearer, open_channel
from loraplex.client.errors import from_rpc_error
from loraplex.client.retry import Deadline, RetryPolicy, retry_wait_s
from loraplex.client.types import Completion, Delta, Message, SamplingOptions
from loraplex.client.wire import Joiner, build_request, to_delta
from loraplex.v1 import inference_pb2, inference_pb2_grpc


class Client:
    """A blocking client of one engine's `Inference` service. Thread-safe; close it (or
    use it as a context manager) to release the channel."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str = "",
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: ChannelOptions = (),
    ) -> None:
        """`target` is "host:port"; `api_key` is sent as "authorization: Bearer <key>"
        (engines run without a control plane accept calls without one); `credentials`
        switches to TLS."""
        self._retry = retry or RetryPolicy()
        self._metadata = bearer(api_key)
        self._channel = open_channel(target, self._retry, credentials, channel_options)
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
    ) -> Iterator[Delta]:
        """Streams the completion of one prompt: plain text, chat `messages` (rendered
        with the model's chat template) or `token_ids`, exactly one of them. `adapter`:
        "" = the base model, "tenant/name" (current version) or "tenant/name@version".

        The call starts at the first `next()`. Closing the iterator (`close()`, leaving
        a `for` loop early, garbage collection) cancels the call on the engine."""
        request = build_request(prompt, messages, token_ids, adapter, request_id, dict(sampling))
        return self._stream(request, timeout)

    def generate_text(
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
        for delta in stream:
            joiner.add(delta)
        return joiner.completion()

    def chat(
        self,
        messages: Sequence[Message],
        *,
        adapter: str = "",
        timeout: float | None = None,
        request_id: str = "",
        **sampling: Unpack[SamplingOptions],
    ) -> Completion:
        """The assistant's answer to `messages` (ChatMessage or {"role", "content"}
        dicts); stream it with `generate(messages=...)`."""
        return self.generate_text(
            messages=messages, adapter=adapter, timeout=timeout, request_id=request_id, **sampling
        )

    def _stream(
        self, request: inference_pb2.GenerateRequest, timeout: float | None
    ) -> Iterator[Delta]:
        deadline = Deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.Generate(
                request, metadata=self._metadata, timeout=deadline.remaining_s()
            )
            received = False
            try:
                for response in call:
                    received = True
                    yield to_delta(response)
                return
            except grpc.RpcError as exc:
                wait_s = retry_wait_s(self._retry, attempt, exc.code(), received, deadline)
                if wait_s is None:
                    raise from_rpc_error(exc) from exc
            finally:
                call.cancel()  # the caller closed the iterator; a no-op once the call ended
            time.sleep(wait_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
