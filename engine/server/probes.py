"""Startup, readiness and liveness of one engine, kept in one place and reported both
as gRPC health (per service name) and as the HTTP API's `/health` and `/ready`.

- Startup: the ports open only once the model is loaded and warmed up (CUDA graphs
  captured, kernels compiled), so "the port answers" is the startup signal.
- Liveness (`/health`, gRPC service `liveness`): the process answers on its event loop
  and the engine loop thread runs. Only a dead engine loop fails it: restarting the
  process is then the only cure.
- Readiness (`/ready`, gRPC services `""` and `loraplex.v1.Inference`): liveness, and
  serving has started and is not draining (SIGTERM). Traffic should go elsewhere while
  it fails; calls in flight still finish.
- `loraplex.v1.EngineAdmin` stays SERVING while the server runs, drain included: the
  control plane may still list and evict adapters of a draining engine.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from grpc_health.v1 import health, health_pb2

from engine.engine import EngineLoop
from loraplex.v1 import engine_admin_pb2, inference_pb2

LIVENESS_SERVICE = "liveness"
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE = engine_admin_pb2.DESCRIPTOR.services_by_name["EngineAdmin"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Phase(StrEnum):
    STARTING = "starting"  # ports bound, serving not started yet
    SERVING = "serving"
    DRAINING = "draining"  # after SIGTERM: calls in flight finish, new ones are refused
    STOPPED = "stopped"


class ServingState:
    """The engine's phase; each transition updates gRPC health. Used on the asyncio loop."""

    def __init__(self, engine: EngineLoop, health_servicer: health.aio.HealthServicer) -> None:
        self._engine = engine
        self._health = health_servicer
        self.phase = Phase.STARTING
        # Told each change too: (service, serving), service None = all down for good.
        # The front end's public port reports health this way (engine.server.frontend).
        self.mirror: Callable[[str | None, bool], None] | None = None

    async def serving(self) -> None:
        self.phase = Phase.SERVING
        for name in ("", INFERENCE_SERVICE, ADMIN_SERVICE, LIVENESS_SERVICE):
            await self._set(name, serving=True)

    async def draining(self) -> None:
        self.phase = Phase.DRAINING
        for name in ("", INFERENCE_SERVICE):
            await self._set(name, serving=False)

    async def engine_stopped(self) -> None:
        """The engine loop thread has died: neither ready nor alive any more."""
        for name in ("", INFERENCE_SERVICE, LIVENESS_SERVICE):
            await self._set(name, serving=False)

    async def stopped(self) -> None:
        """The server is going away: every service NOT_SERVING, for good."""
        self.phase = Phase.STOPPED
        await self._health.enter_graceful_shutdown()
        if self.mirror is not None:
            self.mirror(None, False)

    async def _set(self, name: str, serving: bool) -> None:
        await self._health.set(name, _SERVING if serving else _NOT_SERVING)
        if self.mirror is not None:
            self.mirror(name, serving)

    def liveness(self) -> tuple[bool, str]:
        """(alive, why): answered on the event loop, so answering proves it runs."""
        if not self._engine.is_alive():
            return False, "the engine loop has stopped; restart this engine"
        return True, "alive"

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for new requests."""
        alive, why = self.liveness()
        if not alive:
            return False, why
        if self.phase is Phase.SERVING:
            return True, "ready"
        return False, {
            Phase.STARTING: "starting: the servers are not serving yet",
            Phase.DRAINING: "draining: shutting down, calls in flight are finishing",
            Phase.STOPPED: "stopped",
        }[self.phase]
