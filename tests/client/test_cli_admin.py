"""The admin commands of `loraplex`, now thin over `AdminClient`, as a user runs them:
subprocesses against a real control plane on Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.control_plane.cp_harness import ADMIN_TOKEN, ControlPlaneHandle


def loraplex(
    cp: ControlPlaneHandle, *args: str, token: str = ADMIN_TOKEN
) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAPLEX_ADMIN_TOKEN": token, "LORAPLEX_CONTROL_PLANE": cp.address}
    return subprocess.run([sys.executable, "-m", "loraplex.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip


def test_admin_commands_print_tables_and_refusals_as_sentences(
    cp: ControlPlaneHandle, base_dir: Path, good_adapter: Path
) -> None:
    created = loraplex(cp, "tenants", "create", "acme", "--max-adapters", "3")
    assert created.returncode == 0, created.stderr
    assert created.stdout.split("\n")[1].split()[:3] == ["acme", "active", "0/3"]
    again = loraplex(cp, "tenants", "create", "acme")
    assert again.returncode == 1 and again.stderr.startswith("error: ALREADY_EXISTS: ")
    assert "Traceback" not in again.stderr

    key = loraplex(cp, "keys", "create", "acme")
    assert key.returncode == 0 and "api key: lpx_" in key.stdout and "not shown again" in key.stdout
    model = loraplex(cp, "base-models", "register", "tiny", str(base_dir))
    assert model.returncode == 0 and "tiny" in model.stdout, model.stderr
    registered = loraplex(cp, "adapters", "register", "acme", "support", str(good_adapter),
                          "--base-model", "tiny")  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    listed = loraplex(cp, "adapters", "list", "--tenant", "acme")
    [row] = listed.stdout.strip().split("\n")[1:]
    assert row.split()[:4] == ["acme/support", "1", "active", "*"]
    resolved = loraplex(cp, "adapters", "resolve", "acme/support")
    assert "acme/support@1" in resolved.stdout and "no live engine yet" in resolved.stdout
    retired = loraplex(cp, "adapters", "retire", "acme", "support")
    assert retired.returncode == 0 and "retired" in retired.stdout

    refused = loraplex(cp, "tenants", "list", token="not-the-admin-token")
    assert refused.returncode == 1 and refused.stderr.startswith("error: UNAUTHENTICATED: ")
