"""Shared helpers of the RPC tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest

from loraplex.v1 import control_plane_pb2 as pb

BASE = "tiny"


def code_of(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call(request)
    return exc.value.code(), exc.value.details()


def register(admin: Any, name: str, folder: Path, tenant: str = "acme", **kw: Any) -> Any:
    return admin.RegisterAdapter(
        pb.RegisterAdapterRequest(tenant=tenant, name=name, uri=str(folder), base_model=BASE, **kw)
    )


def sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
