"""A real engine with its HTTP API on loopback, two tenants' keys and one adapter each,
for the HTTP API, gateway-metric and probe tests; plus a raw HTTP helper."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from loraplex.keys import hash_secret, new_key
from loraplex.v1 import engine_admin_pb2 as admin_pb
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import RunningEngine, running_engine
from tests.ports import free_port

TENANTS = ("acme", "globex")
# adapter id -> (tenant, alias, seed): ids and aliases as the control plane names them.
ADAPTERS = {"acme/pirate@1": ("acme", "acme/pirate", 1), "globex/g@1": ("globex", "globex/g", 2)}


@dataclass
class HttpEngine:
    running: RunningEngine
    http_port: int
    keys: dict[str, str]  # tenant -> full API key

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def base_model(self) -> str:
        return self.running.parts.model_config.name

    def grpc_auth(self, tenant: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.keys[tenant]}")]


@contextmanager
def http_engine(model_path: Path, adapter_dir: Path, **config: Any) -> Iterator[HttpEngine]:
    """Serves `model_path` with keys for TENANTS and ADAPTERS loaded (made under
    `adapter_dir`); `config` overrides EngineConfig fields."""
    folders = {
        adapter_id: make_peft_adapter(
            model_path, adapter_dir / adapter_id.replace("/", "_"), r=4, alpha=8,
            target_modules=["q_proj", "v_proj"], seed=seed, strength=1.0,
        )
        for adapter_id, (_tenant, _alias, seed) in ADAPTERS.items()
    }  # fmt: skip
    base = EngineConfig(
        model_path=model_path,
        port=0,
        http_port=free_port(),
        kv_cache_tokens=4096,
        adapter_roots=(adapter_dir.resolve(),),
    )
    cfg = dataclasses.replace(base, **config)
    keys = {tenant: new_key() for tenant in TENANTS}
    with running_engine(cfg) as running:
        entries = [
            admin_pb.ApiKeyEntry(key_id=key_id, secret_hash=hash_secret(secret), tenant=tenant)
            for tenant, (key_id, secret, _) in keys.items()
        ]
        running.admin.SyncApiKeys(admin_pb.SyncApiKeysRequest(generation=1, keys=entries))
        for adapter_id, (tenant, alias, _seed) in ADAPTERS.items():
            running.admin.LoadAdapter(
                admin_pb.LoadAdapterRequest(
                    adapter_id=adapter_id,
                    path=str(folders[adapter_id]),
                    tenant=tenant,
                    aliases=[alias],
                )
            )
        yield HttpEngine(running, cfg.http_port, {t: k[2] for t, k in keys.items()})


def http(
    method: str, url: str, body: Any = None, key: str | None = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON body) of one request; HTTP errors are answers too."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
