"""The chart's gRPC probes ask real servers for health service names they serve: the
kubelet counts a probe as passed only when Health/Check answers SERVING for that name
(NOT_FOUND for a name nobody registered would keep an engine unready forever)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.config import ControlPlaneConfig
from control_plane.db import sqlite_url
from engine.config import EngineConfig
from tests.control_plane.cp_harness import ADMIN_TOKEN, running_control_plane
from tests.deploy.helm_render import container, find, render
from tests.engine_server import running_engine

FULL = "lpx-loraplex"


def _probe_services(workload: dict, name: str) -> dict[str, str]:
    c = container(workload, name)
    return {
        kind: c[f"{kind}Probe"]["grpc"]["service"]
        for kind in ("startup", "readiness", "liveness")
        if f"{kind}Probe" in c
    }


def _check(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_engine_probes_name_services_a_running_engine_reports_serving(tiny_llama31_path: Path):
    services = _probe_services(find(render(), "StatefulSet", f"{FULL}-engine"), "engine")
    assert set(services) == {"startup", "readiness", "liveness"}
    config = EngineConfig(
        model_path=tiny_llama31_path, device="cpu", port=0, kv_cache_tokens=1024, max_loras=2
    )
    with running_engine(config) as engine:
        for service in services.values():
            assert _check(engine.channel, service) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            _check(engine.channel, "loraplex.v1.NoSuchService")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_control_plane_probes_name_services_a_running_control_plane_serves(tmp_path: Path):
    deployment = find(render(), "Deployment", f"{FULL}-control-plane")
    services = _probe_services(deployment, "control-plane")
    assert set(services) == {"readiness", "liveness"}
    config = ControlPlaneConfig(
        database_url=sqlite_url(tmp_path / "cp.db"),
        admin_token=ADMIN_TOKEN,
        host="127.0.0.1",
        port=0,
        auto_migrate=True,
    )
    with running_control_plane(config) as cp:
        for service in services.values():
            assert _check(cp.channel, service) == health_pb2.HealthCheckResponse.SERVING
