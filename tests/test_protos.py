"""The committed stubs in loraplex/v1 must be what `make protos` generates now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    generated = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc generated nothing"
    stale = [
        str(path.relative_to(tmp_path))
        for path in generated
        if (ROOT / path.relative_to(tmp_path)).read_bytes() != path.read_bytes()
        if (ROOT / path.relative_to(tmp_path)).exists()
    ]
    missing = [
        str(p.relative_to(tmp_path))
        for p in generated
        if not (ROOT / p.relative_to(tmp_path)).exists()
    ]
    assert not stale and not missing, (
        f"stale stubs {stale}, missing stubs {missing}: run `make protos` and commit the result"
    )


def test_stubs_import_as_loraplex_v1():
    from loraplex.v1 import engine_admin_pb2_grpc, inference_pb2, inference_pb2_grpc  # noqa: F401

    assert inference_pb2.DESCRIPTOR.package == "loraplex.v1"
