"""Wire the control plane together and serve it: ControlPlane + Health + reflection.

`start_control_plane` returns a running instance (tests use port 0 and stop it);
`serve_control_plane` runs one until cancelled or signalled (SIGTERM drains first).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine

from control_plane import migrate
from control_plane.admin_auth import AdminTokenInterceptor
from control_plane.config import ControlPlaneConfig
from control_plane.db import make_db_engine, make_session_factory
from control_plane.draining import DrainInterceptor
from control_plane.metrics import ControlPlaneMetrics, RpcMetricsInterceptor
from control_plane.reconciler.engine_client import EngineClient
from control_plane.reconciler.loop import Reconciler
from control_plane.reconciler.store import ReconcileStore
from control_plane.servicer import ControlPlaneServicer, Services
from control_plane.services.adapters import AdapterService
from control_plane.services.base_models import BaseModelService
from control_plane.services.common import ServiceContext, utcnow
from control_plane.services.engines import EngineService
from control_plane.services.tenants import TenantService
from loraplex.metrics_http import serve_metrics
from loraplex.v1 import control_plane_pb2, control_plane_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name


class NotMigratedError(RuntimeError):
    """The database is behind the migrations; the message says how to fix it."""


@dataclass
class RunningControlPlane:
    server: grpc.aio.Server
    port: int
    reconciler: Reconciler
    services: Services
    db_engine: Engine
    metrics: ControlPlaneMetrics
    _reconcile_task: asyncio.Task[None]
    _client: EngineClient
    _health: health.aio.HealthServicer
    _drain: DrainInterceptor
    _stop_metrics: Callable[[], None] | None = None

    async def stop(self, grace: float = 1.0) -> None:
        """Health NOT_SERVING and new calls UNAVAILABLE at once; then the reconciler
        stops (after the database work under way) while the calls in flight get up to
        `grace` seconds; then the server stops, ending what still runs as cancelled.
        Never raises for a database that is down: the server stops regardless."""
        await self._health.enter_graceful_shutdown()
        self._drain.start_draining()
        log.info("stopping: %d calls in flight get up to %g s", self._drain.num_in_flight, grace)
        try:
            await asyncio.gather(self._stop_reconciler(), self._drain.wait_idle(grace))
        finally:
            await self.server.stop(0)
            await self._client.close()
            if self._stop_metrics is not None:
                self._stop_metrics()
            self.db_engine.dispose()

    async def _stop_reconciler(self) -> None:
        self.reconciler.stop_soon()
        self._reconcile_task.cancel()
        [outcome] = await asyncio.gather(self._reconcile_task, return_exceptions=True)
        if isinstance(outcome, Exception):
            log.error("the reconciler failed while stopping", exc_info=outcome)


async def start_control_plane(config: ControlPlaneConfig) -> RunningControlPlane:
    if config.auto_migrate:
        await asyncio.to_thread(migrate.upgrade, config.database_url)
    elif not await asyncio.to_thread(migrate.is_up_to_date, config.database_url):
        raise NotMigratedError(
            "the database schema is not at the latest migration; run "
            "`loraplex control-plane migrate` first"
        )
    db_engine = make_db_engine(
        config.database_url,
        connect_timeout_s=config.db_connect_timeout_s,
        statement_timeout_s=config.db_statement_timeout_s,
    )
    loop = asyncio.get_running_loop()
    rc = config.reconciler
    reconciler_ref: list[Reconciler] = []
    ctx = ServiceContext(
        sessions=make_session_factory(db_engine),
        clock=utcnow,
        on_change=lambda: reconciler_ref[0].nudge() if reconciler_ref else None,
    )
    heartbeat_timeout = timedelta(seconds=rc.heartbeat_timeout_s)
    services = Services(
        tenants=TenantService(ctx, config.default_max_adapters),
        base_models=BaseModelService(ctx, config.default_max_lora_rank),
        adapters=AdapterService(ctx, config.adapter_roots),
        engines=EngineService(ctx, heartbeat_timeout),
    )
    store = ReconcileStore(
        ctx,
        heartbeat_timeout=heartbeat_timeout,
        lease=timedelta(seconds=rc.lease_s),
        retry_base=timedelta(seconds=rc.retry_base_s),
        retry_cap=timedelta(seconds=rc.retry_cap_s),
        fail_after_attempts=rc.fail_after_attempts,
        permanent_codes=rc.permanent_codes,
    )
    metrics = ControlPlaneMetrics()
    metrics.watch(ctx.sessions, config.metrics_cache_s)
    client = EngineClient(config.admin_token, rc.rpc_timeout_s, rc.load_timeout_s, metrics)
    reconciler = Reconciler(rc, store, client, utcnow, metrics)
    reconciler.bind(loop)
    reconciler_ref.append(reconciler)

    stop_metrics = None
    if config.metrics_port:  # before the gRPC server: a busy port fails with nothing started
        stop_metrics = serve_metrics(metrics.registry, config.host, config.metrics_port)
        log.info("control plane metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    # Metrics first, so the refusals of the drain and the admin token check count too.
    drain = DrainInterceptor(f"/{SERVICE_NAME}/")
    server = grpc.aio.server(
        interceptors=[
            RpcMetricsInterceptor(metrics),
            drain,
            AdminTokenInterceptor(config.admin_token),
        ],
        # gRPC shares a taken port by default (SO_REUSEPORT): a second server would
        # silently split the traffic. Binding must fail instead.
        options=[("grpc.so_reuseport", 0)],
    )
    control_plane_pb2_grpc.add_ControlPlaneServicer_to_server(
        ControlPlaneServicer(services, config.admin_token), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    task = asyncio.create_task(reconciler.run(), name="reconciler")
    log.info("control plane listening on %s:%d", config.host, port)
    return RunningControlPlane(
        server, port, reconciler, services, db_engine, metrics, task, client, health_servicer,
        drain, stop_metrics,
    )  # fmt: skip


async def serve_control_plane(config: ControlPlaneConfig) -> None:
    """Serve until SIGINT/SIGTERM or cancellation, then stop with the configured grace
    (RunningControlPlane.stop) and return, also when the database is out of reach."""
    running = await start_control_plane(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        await running.stop(config.shutdown_grace_s)
