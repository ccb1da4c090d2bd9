"""Carrying the engine loop's outputs to the gRPC handlers on the asyncio loop, cheaply.

The engine loop produces one `RequestOutput` per running request per step. Waking the
asyncio loop once per output costs a system call each (`call_soon_threadsafe` writes to
the loop's self-pipe) and a handler wake-up each; at a few hundred streams that is a
large share of a decode step, paid under the GIL the engine loop needs too. Here:

- `OutputMailbox` (one per servicer) batches: whatever outputs the engine loop posts
  while a delivery is pending ride along with it, so a step costs one wake-up however
  many streams it feeds.
- `OutputStream` (one per request) buffers what was delivered; its handler takes
  everything buffered at once (`next_batch`), so a handler that fell behind catches up
  with one gRPC message instead of one per token (`merge`). A front end that only
  relays outputs (the front-end process's link) gives it a consumer instead
  (`consume`): the delivery hands each output over at once, with no task woken per
  output.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

from engine.request import RequestOutput


class OutputStream:
    """The outputs of one request, filled on the asyncio loop by `OutputMailbox`."""

    def __init__(self) -> None:
        self._buffer: deque[RequestOutput] = deque()
        self._ready = asyncio.Event()
        self._consumer: Callable[[RequestOutput], None] | None = None

    def push(self, out: RequestOutput) -> None:
        """Called on the asyncio loop's thread."""
        if self._consumer is not None:
            self._consumer(out)
            return
        self._buffer.append(out)
        self._ready.set()

    def consume(self, consumer: Callable[[RequestOutput], None]) -> None:
        """From now on every output goes to `consumer` as it is delivered (those already
        buffered first), on the asyncio loop's thread; `next_batch` is not used again."""
        while self._buffer:
            consumer(self._buffer.popleft())
        self._consumer = consumer

    async def next_batch(self) -> list[RequestOutput]:
        """Every output delivered since the last call (at least one; waits for it)."""
        while not self._buffer:
            self._ready.clear()
            await self._ready.wait()
        batch = list(self._buffer)
        self._buffer.clear()
        return batch


class OutputMailbox:
    """Posts outputs from the engine loop's thread to `OutputStream`s on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[OutputStream, RequestOutput]] = []

    def sender(self, stream: OutputStream) -> Callable[[RequestOutput], None]:
        """The `emit` callback the engine loop calls for `stream`'s request."""

        def send(out: RequestOutput) -> None:
            with self._lock:
                self._pending.append((stream, out))
                wake = len(self._pending) == 1  # else a delivery is already on its way
            if wake:
                self._loop.call_soon_threadsafe(self._deliver)

        return send

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for stream, out in pending:
            stream.push(out)


def merge(outputs: list[RequestOutput]) -> RequestOutput:
    """One output equivalent to `outputs` in order: their text and tokens concatenated,
    the finish (reason, usage, error) of the last. Only the last may carry a finish."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    return RequestOutput(
        text="".join(out.text for out in outputs),
        token_ids=tuple(token for out in outputs for token in out.token_ids),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        error=last.error,
    )
