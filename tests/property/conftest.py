"""One real engine per test module for the property tests: a tiny Llama with the SmolLM2
tokenizer, two tenants' API keys, adapters of both tenants (one of them evicted), all
served over loopback gRPC. `assert_still_serving` is the check every batch of random
examples ends with."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.config import EngineConfig
from loraplex.keys import hash_secret, new_key
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import inference_pb2
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import RunningEngine, collect, running_engine
from tests.property.checks import CALL_TIMEOUT_S, eventually

ADMIN_TOKEN = "property-admin-token"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
MAX_MODEL_LEN = 256  # small, so that any request the engine accepts finishes quickly
TENANTS = ("acme", "globex")
# id -> (tenant, aliases); "acme-old" is evicted once loaded.
ADAPTERS = {
    "acme-a": ("acme", ("acme/a", "acme/a@1")),
    "globex-g": ("globex", ("globex/g", "globex/g@1")),
    "acme-old": ("acme", ("acme/old",)),
}
ADAPTER_NAMES = tuple(name for id_, (_, aliases) in ADAPTERS.items() for name in (id_, *aliases))


@dataclass
class ServedEngine:
    running: RunningEngine
    adapter_root: Path
    adapter_folder: Path
    keys: dict[str, str]  # tenant -> whole API key

    def tenant(self, name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[name]}"),)


def good_request(adapter: str = "") -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        adapter=adapter,
        token_ids=inference_pb2.TokenIds(ids=[5, 6, 7]),
        sampling=inference_pb2.SamplingParams(max_new_tokens=3, ignore_eos=True),
    )


def assert_still_serving(served: ServedEngine) -> None:
    """A good request of each tenant (base model and own adapter) gets its 3 tokens, and
    the engine returns to idle: nothing running or waiting, every KV block free, no
    adapter holding a request."""
    running = served.running
    for tenant, adapter in (("acme", ""), ("acme", "acme/a"), ("globex", "globex-g")):
        result = collect(
            running.inference.Generate(
                good_request(adapter), metadata=served.tenant(tenant), timeout=CALL_TIMEOUT_S
            )
        )
        assert result.completion_tokens == 3, (tenant, adapter)

    def idle() -> bool:
        info = running.admin.GetEngineInfo(admin_pb.GetEngineInfoRequest(), metadata=ADMIN)
        listed = running.admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=ADMIN)
        return (
            info.running_requests == 0
            and info.waiting_requests == 0
            and info.kv_blocks_free == info.kv_blocks_total
            and all(a.requests_in_flight == 0 for a in listed.adapters)
        )

    assert eventually(idle), "the engine did not return to idle"


@pytest.fixture(scope="module")
def served(
    tiny_llama31_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedEngine]:
    root = tmp_path_factory.mktemp("property-adapters")
    folder = make_peft_adapter(
        tiny_llama31_path, root / "a", r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=1
    )
    config = EngineConfig(
        model_path=tiny_llama31_path,
        port=0,
        kv_cache_tokens=4096,
        max_model_len=MAX_MODEL_LEN,
        max_loras=2,
        max_lora_rank=16,
        adapter_roots=(root,),
        admin_token=ADMIN_TOKEN,
    )
    keys = {tenant: new_key() for tenant in TENANTS}
    with running_engine(config) as running:
        entries = [
            admin_pb.ApiKeyEntry(key_id=key_id, secret_hash=hash_secret(secret), tenant=tenant)
            for tenant, (key_id, secret, _) in keys.items()
        ]
        running.admin.SyncApiKeys(
            admin_pb.SyncApiKeysRequest(generation=1, keys=entries), metadata=ADMIN
        )
        for adapter_id, (tenant, aliases) in ADAPTERS.items():
            running.admin.LoadAdapter(
                admin_pb.LoadAdapterRequest(
                    adapter_id=adapter_id, path=str(folder), tenant=tenant, aliases=aliases
                ),
                metadata=ADMIN,
            )
        running.admin.EvictAdapter(
            admin_pb.EvictAdapterRequest(adapter_id="acme-old"), metadata=ADMIN
        )
        served = ServedEngine(running, root, folder, {t: k[2] for t, k in keys.items()})
        # Each good key is verified once now: floods of wrong keys later may rate-limit
        # new verifications from this address, never a key already accepted.
        assert_still_serving(served)
        yield served
