"""Prometheus metrics of the control plane: fleet state, reconciler work, RPC errors.

Fleet gauges (tenants, adapter versions, engines, placements by state) are read from
the database when scraped, at most once per `max_age_s` however often Prometheus comes.
Counters are fed by events: each reconcile pass, each LoadAdapter / EvictAdapter /
SyncApiKeys call to an engine, and every ControlPlane RPC that ends in an error (a
server interceptor). Labels are bounded: states, gRPC status names, RPC method names.

Each `ControlPlaneMetrics` owns its CollectorRegistry, so several control planes in one
process (tests) never clash; `loraplex.metrics_http` exposes it over HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from control_plane.models import (
    EngineState,
    PlacementDesired,
    PlacementObserved,
    TenantState,
    VersionState,
)
from control_plane.repositories.stats import FleetCounts, StatsRepository

log = logging.getLogger(__name__)
_P = "loraplex_control_plane_"
_PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OK = grpc.StatusCode.OK.name


class ControlPlaneMetrics:
    """The control plane's metrics and the hooks that feed them. Thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.pass_duration = Histogram(
            _P + "reconcile_pass_duration_seconds",
            "One reconciler pass, start to finish",
            buckets=_PASS_BUCKETS,
            registry=r,
        )
        self.pass_failures = Counter(
            _P + "reconcile_pass_failures", "Reconciler passes that raised", registry=r
        )
        self.adapter_loads = Counter(
            _P + "adapter_loads",
            "LoadAdapter calls to engines, by outcome (OK or status)",
            ["outcome"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            _P + "adapter_evictions",
            "EvictAdapter calls to engines, by outcome (OK or status)",
            ["outcome"],
            registry=r,
        )
        self.key_syncs = Counter(
            _P + "key_syncs",
            "SyncApiKeys pushes to engines, by outcome (OK or status)",
            ["outcome"],
            registry=r,
        )
        self.key_generation_restores = Counter(
            _P + "key_generation_restores",
            "Engines found holding a key table newer than the database (a restore); "
            "the generation was moved past theirs",
            registry=r,
        )
        self.rpc_errors = Counter(
            _P + "rpc_errors",
            "Control plane RPCs answered with an error, by method and code",
            ["method", "code"],
            registry=r,
        )
        self._watching = False

    def watch(self, sessions: sessionmaker[Session], max_age_s: float = 5.0) -> None:
        """Adds the fleet gauges, read through `sessions` at scrape time (once)."""
        if not self._watching:
            self.registry.register(_FleetCollector(sessions, max_age_s))
            self._watching = True

    @contextmanager
    def timed_pass(self) -> Iterator[None]:
        """Times one reconcile pass; counts it as failed if it raises."""
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.pass_failures.inc()
            raise
        finally:
            self.pass_duration.observe(time.perf_counter() - start)

    def adapter_loaded(self, code: str) -> None:
        """`code` is "" on success, else a gRPC status name (EngineClient's convention)."""
        self.adapter_loads.labels(code or OK).inc()

    def adapter_evicted(self, code: str) -> None:
        self.adapter_evictions.labels(code or OK).inc()

    def keys_synced(self, code: str) -> None:
        self.key_syncs.labels(code or OK).inc()


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts unary RPCs that end in an error status: aborted, raised (UNKNOWN), or
    returned with a code set. Place it first, so refusals by later interceptors count."""

    def __init__(self, metrics: ControlPlaneMetrics) -> None:
        self._errors = metrics.rpc_errors

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # unknown methods, and streams (reflection, health watch)
        inner = handler.unary_unary
        method = details.method.rsplit("/", 1)[-1]
        errors = self._errors

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                reply = await inner(request, context)
            except Exception:  # an abort carries its code; anything else answers UNKNOWN
                code = context.code() or grpc.StatusCode.UNKNOWN
                if code != grpc.StatusCode.OK:
                    errors.labels(method, code.name).inc()
                raise
            code = context.code()
            if code is not None and code != grpc.StatusCode.OK:
                errors.labels(method, code.name).inc()
            return reply

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _FleetCollector(Collector):
    """Fleet gauges from the database, cached for `max_age_s`. A failed read logs and
    yields no fleet gauges (absent series, not stale ones) and leaves the rest alone."""

    def __init__(self, sessions: sessionmaker[Session], max_age_s: float) -> None:
        self._sessions = sessions
        self._max_age_s = max_age_s
        self._lock = threading.Lock()  # one database read at a time, whoever scrapes
        self._counts: FleetCounts | None = None
        self._read_at = 0.0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._fresh_counts()
        if counts is None:
            return
        yield _by_state("tenants", "Tenants by state", TenantState, counts.tenants)
        yield _by_state(
            "adapter_versions", "Adapter versions by state", VersionState, counts.adapter_versions
        )
        yield _by_state("engines", "Registered engines by state", EngineState, counts.engines)
        placements = GaugeMetricFamily(
            _P + "placements",
            "Version-on-engine placements by desired and observed state",
            labels=["desired", "observed"],
        )
        for desired in PlacementDesired:
            for observed in PlacementObserved:
                n = counts.placements.get((desired.value, observed.value), 0)
                placements.add_metric([desired.value, observed.value], n)
        yield placements

    def _fresh_counts(self) -> FleetCounts | None:
        with self._lock:
            now = time.monotonic()
            if self._counts is None or now - self._read_at >= self._max_age_s:
                try:
                    with self._sessions() as session:
                        self._counts = StatsRepository(session).fleet_counts()
                except SQLAlchemyError:
                    log.warning("metrics: cannot read fleet counts", exc_info=True)
                    self._counts = None
                    return None
                self._read_at = now
            return self._counts


def _by_state(name: str, documentation: str, states: Any, counts: dict[str, int]):
    family = GaugeMetricFamily(_P + name, documentation, labels=["state"])
    for state in states:  # every state, zeros included: series do not come and go
        family.add_metric([state.value], counts.get(state.value, 0))
    return family
