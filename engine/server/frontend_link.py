"""The wire between an engine process and its front-end process (`engine.server.frontend`).

One socket pair, made by the engine and inherited by the front end it spawns: no path and
no port, so no other process can write to it. Each frame is a 4-byte big-endian length
and a pickled list of events (tuples); both ends are this codebase's own processes.
Torch-free: the front end imports it.

Front end to engine:
- `("open", sid, request_bytes, authorization, peer)`: a Generate call arrived (`sid`:
  the front end's number for it; `request_bytes`: the serialized GenerateRequest).
- `("abort", sid)`: its caller went away.
- `("bound", port)` once, after binding the public port; or `("failed", sentence)`.

Engine to front end, all events of one engine step in one frame:
- `("config", FrontendConfig)` once, first.
- `("head", sid, request_id, adapter_id)`: admitted; outputs follow.
- `("out", sid, text, token_ids, finish, prompt_tokens, completion_tokens, error)`:
  `finish` is "" until the last output, then a `FinishReason` value.
- `("refused", sid, status_name, sentence)`: the call ends with that gRPC status.
- `("health", service, serving)`: a health status changed (`service` None: all of them,
  for good: the engine is going away).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

_LENGTH = struct.Struct(">I")

Event = tuple[Any, ...]


@dataclass(frozen=True)
class FrontendConfig:
    """What the front end needs to serve for the engine."""

    host: str
    port: int  # the public port (0: any free one)
    engine_target: str  # the engine's own gRPC server on loopback, for EngineAdmin
    admin_token: str  # "" = loopback callers only, as on the engine


def encode(events: list[Event]) -> bytes:
    body = pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_events(reader: asyncio.StreamReader) -> list[Event] | None:
    """The next frame's events; None once the other end has closed the link."""
    try:
        header = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(header)
        return pickle.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class Outbox:
    """Events posted during one turn of the asyncio loop leave as one frame at its end,
    so a step's outputs for every stream cost one write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[Event] = []

    def post(self, event: Event) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(event)

    def _flush(self) -> None:
        events, self._pending = self._pending, []
        if not self._writer.is_closing():
            self._writer.write(encode(events))
