"""Render the Helm chart offline and look inside the manifests.

Rendering uses Helm's own template engine (the `helm-python-sdk` wheel binds Helm's Go
SDK), and every manifest of a built-in kind is validated against that Kubernetes
version's OpenAPI schemas by `kubernetes-validate`, strictly (unknown fields fail):
no cluster runs here, so this is what `helm install` would hand the API server.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "loraplex"
RELEASE = "lpx"
NAMESPACE = "ml"
# The chart's kubeVersion floor (gRPC probes are GA from 1.27) and the newest schemas.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
POD_NAME = "pod-0"  # what a fieldRef to metadata.name yields here
# Kinds that come from CRDs, which kubernetes-validate has no schemas for.
CRD_KINDS = {"ServiceMonitor"}


def render_text(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm install RELEASE -n NAMESPACE` renders it."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest the chart renders with `values`, each validated on the way."""
    manifests = [
        doc
        for path, text in render_text(values).items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    for manifest in manifests:
        validate(manifest)
    return manifests


def validate(manifest: dict[str, Any]) -> None:
    """Raises kubernetes_validate.ValidationError naming the offending field."""
    if manifest["kind"] in CRD_KINDS:
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


def find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def kinds(manifests: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((m["kind"], m["metadata"]["name"]) for m in manifests)


def container(workload: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    spec = workload["spec"]["template"]["spec"]
    found = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name} in {workload['metadata']['name']}"
    return found[0]


def env_values(container_spec: dict[str, Any], secrets: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: secretKeyRef entries read
    from `secrets` ("SECRET/KEY" -> value) and $(VAR) references expanded in order."""
    env: dict[str, str] = {}
    for entry in container_spec.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(entry["value"], env)
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[f"{ref['name']}/{ref['key']}"]
        elif "fieldRef" in entry.get("valueFrom", {}):
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[entry["name"]] = POD_NAME
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) substitution in env values, command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


def secret_refs(manifests: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every secretKeyRef of every container, init containers included."""
    refs = []
    for m in manifests:
        if m["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = m["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append({"env": entry["name"], "container": c["name"], **ref})
    return refs
