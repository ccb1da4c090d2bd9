"""The Helm chart (deploy/helm/loraplex): rendered by Helm, validated against the
Kubernetes schemas, and its containers' arguments parsed by the real `loraplex` CLI, so
the chart cannot drift from the processes' flags, ports and environment variables."""

from __future__ import annotations

import base64
import re

import helm_python as helm
import pytest
from sqlalchemy.engine import make_url

from loraplex.cli import build_parser
from tests.deploy.helm_render import (
    CHART,
    POD_NAME,
    container,
    env_values,
    expand,
    find,
    kinds,
    render,
    render_text,
    secret_refs,
)

FULL = "lpx-loraplex"
CP, ENGINE, HEADLESS, PG = (
    f"{FULL}-control-plane",
    f"{FULL}-engine",
    f"{FULL}-engine-headless",
    f"{FULL}-postgresql",
)
EXTERNAL_DB = {"postgresql": {"enabled": False}, "database": {"existingSecret": "db-creds"}}


def _secrets(manifests: list[dict]) -> dict[str, str]:
    """SECRET/KEY -> value of the chart's Secrets, plus made-up existing ones."""
    found = {
        "db-creds/database-url": "postgresql+psycopg://u:p@db.example:5432/lora",
        "lpx-admin/token": "token-from-existing-secret",
    }
    for m in manifests:
        if m["kind"] == "Secret":
            for key, value in m["data"].items():
                found[f"{m['metadata']['name']}/{key}"] = base64.b64decode(value).decode()
    return found


def _parse(container_spec: dict, secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """Parse the container's args with the real CLI, under the container's environment."""
    env = env_values(container_spec, secrets)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args([expand(a, env) for a in container_spec["args"]]), env


def test_default_values_render_valid_manifests_and_lint_clean():
    manifests = render()
    assert kinds(manifests) == [
        ("Deployment", CP),
        ("PersistentVolumeClaim", f"{FULL}-adapters"),
        ("PersistentVolumeClaim", f"{FULL}-models"),
        ("Secret", f"{FULL}-admin-token"),
        ("Secret", PG),
        ("Service", CP),
        ("Service", ENGINE),
        ("Service", HEADLESS),
        ("Service", PG),
        ("StatefulSet", ENGINE),
        ("StatefulSet", PG),
    ]
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_engine_args_parse_and_match_ports_probes_grace_and_volumes(monkeypatch):
    manifests = render({"engine": {"shutdownGrace": 90.5, "maxLoras": 32, "maxCpuLoras": 256}})
    engine = find(manifests, "StatefulSet", ENGINE)
    spec = engine["spec"]["template"]["spec"]
    c = container(engine, "engine")
    args, env = _parse(c, _secrets(manifests), monkeypatch)
    assert args.func.__name__ == "_engine_serve"
    assert (args.max_loras, args.max_cpu_loras, args.shutdown_grace) == (32, 256, 90.5)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port, "http": args.http_port}
    for name in (ENGINE, HEADLESS):
        service_ports = find(manifests, "Service", name)["spec"]["ports"]
        assert {p["name"]: p["port"] for p in service_ports if p["name"] != "metrics"} == {
            "grpc": args.port,
            "http": args.http_port,
        }
    for kind, service in (
        ("startup", "liveness"),
        ("readiness", "loraplex.v1.Inference"),
        ("liveness", "liveness"),
    ):
        assert c[f"{kind}Probe"]["grpc"] == {"port": args.port, "service": service}
    # The kubelet's SIGKILL may come only after the preStop sleep and the whole drain.
    assert spec["terminationGracePeriodSeconds"] == 5 + 91 + 15
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert args.admin_token == env["LORAPLEX_ADMIN_TOKEN"] != ""
    assert args.control_plane == f"{CP}:50050"
    host, port = args.advertise.rsplit(":", 1)
    assert (host, int(port)) == (f"{POD_NAME}.{HEADLESS}.ml.svc.cluster.local", args.port)
    assert find(manifests, "Service", HEADLESS)["spec"]["clusterIP"] == "None"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert args.adapter_root == [mounts["adapters"]["mountPath"]] == ["/adapters"]
    assert mounts["adapters"]["readOnly"] is True
    assert args.cache_dir == mounts["models"]["mountPath"]


def test_cpu_engine_asks_for_no_gpu_and_extra_args_reach_the_cli(monkeypatch):
    manifests = render(
        {"engine": {"gpus": 0, "device": "cpu", "extraArgs": ["--max-requests-per-tenant", "8"]}}
    )
    c = container(find(manifests, "StatefulSet", ENGINE), "engine")
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}}
    args, _ = _parse(c, _secrets(manifests), monkeypatch)
    assert (args.device, args.max_requests_per_tenant) == ("cpu", 8)


def test_http_port_zero_turns_the_http_api_off(monkeypatch):
    manifests = render({"engine": {"httpPort": 0}})
    c = container(find(manifests, "StatefulSet", ENGINE), "engine")
    args, _ = _parse(c, _secrets(manifests), monkeypatch)
    assert args.http_port == 0
    assert [p["name"] for p in c["ports"]] == ["grpc", "metrics"]
    assert [p["name"] for p in find(manifests, "Service", ENGINE)["spec"]["ports"]] == ["grpc"]


def test_control_plane_and_migration_use_the_bundled_postgres(monkeypatch):
    manifests = render()
    deployment = find(manifests, "Deployment", CP)
    secrets = _secrets(manifests)
    args, env = _parse(container(deployment, "control-plane"), secrets, monkeypatch)
    assert args.func.__name__ == "_serve" and args.adapter_root == ["/adapters"]
    assert (args.replica_id, args.shutdown_grace) == (POD_NAME, 10.0)
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 20
    migrate, _ = _parse(container(deployment, "migrate", init=True), secrets, monkeypatch)
    assert migrate.func.__name__ == "_migrate"
    url = make_url(args.database_url)
    assert url == make_url(migrate.database_url)
    assert (url.drivername, url.host, url.port, url.database, url.username) == (
        "postgresql+psycopg",
        PG,
        5432,
        "loraplex",
        "loraplex",
    )
    assert url.password == secrets[f"{PG}/password"] and len(url.password) == 32
    service = find(manifests, "Service", CP)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": args.port,
        "metrics": args.metrics_port,
    }
    probe = container(deployment, "control-plane")["readinessProbe"]["grpc"]
    assert probe == {"port": args.port, "service": "loraplex.v1.ControlPlane"}
    postgres = container(find(manifests, "StatefulSet", PG), "postgresql")
    assert env_values(postgres, secrets)["POSTGRES_PASSWORD"] == url.password


def test_external_database_comes_from_its_secret_and_no_postgres_is_deployed(monkeypatch):
    manifests = render(EXTERNAL_DB)
    assert not [m for m in manifests if m["metadata"]["name"] == PG]
    deployment = find(manifests, "Deployment", CP)
    for name, init in (("control-plane", False), ("migrate", True)):
        args, _ = _parse(container(deployment, name, init), _secrets(manifests), monkeypatch)
        assert args.database_url == "postgresql+psycopg://u:p@db.example:5432/lora"
    refs = [r for r in secret_refs(manifests) if r["env"] == "LORAPLEX_DATABASE_URL"]
    assert {(r["container"], r["name"], r["key"]) for r in refs} == {
        ("control-plane", "db-creds", "database-url"),
        ("migrate", "db-creds", "database-url"),
    }


def test_database_url_value_lands_only_in_a_secret():
    values = {
        "postgresql": {"enabled": False},
        "database": {"url": "postgresql+psycopg://u:s3cr3t-pw@db:5432/lora"},
    }
    manifests = render(values)
    assert "s3cr3t-pw" not in "".join(render_text(values).values())
    assert _secrets(manifests)[f"{FULL}-database/database-url"] == values["database"]["url"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"postgresql": {"enabled": False}}, "set database.existingSecret"),
        ({"database": {"existingSecret": "db-creds"}}, "set postgresql.enabled=false"),
        ({"engine": {"gpus": 2}}, "engine.gpus must be 0 (CPU) or 1"),
        ({"adminToken": {"value": "too-short"}}, "adminToken.value is shorter than 32"),
        (
            {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
            "needs metrics.enabled=true",
        ),
    ],
)
def test_values_that_cannot_work_fail_with_what_to_set(values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render_text(values)


def test_admin_token_from_an_existing_secret_is_referenced_never_written():
    manifests = render(
        {"adminToken": {"existingSecret": "lpx-admin", "existingSecretKey": "token"}, **EXTERNAL_DB}
    )
    assert not [m for m in manifests if m["kind"] == "Secret"]
    refs = [r for r in secret_refs(manifests) if r["env"] == "LORAPLEX_ADMIN_TOKEN"]
    assert {(r["container"], r["name"], r["key"]) for r in refs} == {
        ("control-plane", "lpx-admin", "token"),
        ("engine", "lpx-admin", "token"),
    }


def test_a_given_admin_token_appears_only_inside_its_secret():
    values = {"adminToken": {"value": "tok-9f8e7d6c5b4a-0123456789abcdef"}}
    assert "tok-9f8e7d6c5b4a-0123456789abcdef" not in "".join(render_text(values).values())
    manifests = render(values)
    assert (
        _secrets(manifests)[f"{FULL}-admin-token/admin-token"]
        == "tok-9f8e7d6c5b4a-0123456789abcdef"
    )
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet"):
            for c in m["spec"]["template"]["spec"]["containers"]:
                plain = {e["name"] for e in c.get("env", []) if "value" in e}
                assert "LORAPLEX_ADMIN_TOKEN" not in plain and "POSTGRES_PASSWORD" not in plain


def test_existing_claims_replace_the_chart_volumes():
    manifests = render(
        {"adapters": {"existingClaim": "team-adapters"}, "models": {"existingClaim": "team-models"}}
    )
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    for kind, name in (("Deployment", CP), ("StatefulSet", ENGINE)):
        volumes = find(manifests, kind, name)["spec"]["template"]["spec"]["volumes"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes}
        assert claims == {"adapters": "team-adapters", "models": "team-models"}


def test_service_monitor_scrapes_the_control_plane_and_each_engine_pod():
    assert not [m for m in render() if m["kind"] == "ServiceMonitor"]
    manifests = render(
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    )
    monitor = find(manifests, "ServiceMonitor", FULL)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = sorted(
        m["metadata"]["name"]
        for m in manifests
        if m["kind"] == "Service" and selector.items() <= m["metadata"]["labels"].items()
    )
    # The headless Service, so every engine pod is its own target.
    assert selected == [CP, HEADLESS]
    for name in selected:
        ports = find(manifests, "Service", name)["spec"]["ports"]
        assert "metrics" in [p["name"] for p in ports]
