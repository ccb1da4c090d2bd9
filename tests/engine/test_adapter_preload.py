"""--adapter-dir preloads in the background: the engine answers health SERVING while a
load is still in progress, ListAdapters shows what is loaded so far, and a request for
an adapter still loading waits for it or, past --adapter-wait-s, gets UNAVAILABLE.

A real preload is held in place by the registry's `before_read` hook (an Event the test
owns), not by a slow disk."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.config import EngineConfig
from engine.server.app import AUTO_MAX_LORAS, build_engine
from loraplex.keys import hash_secret, new_key
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import inference_pb2
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import RunningEngine, running_engine
from tests.hf_reference import hf_greedy, hf_model

PROMPT = [1, 77, 9, 1000, 2000, 3000]
NEW_TOKENS = 6
HELD = "b-held"


@pytest.fixture(scope="module")
def adapter_root(tiny_llama31_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preload")
    for seed, name in enumerate(("a-quick", HELD, "c-quick")):
        make_peft_adapter(
            tiny_llama31_path, root / name, r=4, alpha=8, target_modules=["q_proj"], seed=seed + 1
        )
    return root


@contextmanager
def engine_with_held_load(
    model_path: Path, adapter_root: Path, adapter_wait_s: float
) -> Iterator[tuple[RunningEngine, threading.Event]]:
    """An engine preloading `adapter_root` whose load of HELD blocks until the yielded
    Event is set (it is set on exit, so the preload always ends)."""
    release, reached = threading.Event(), threading.Event()

    def before_read(adapter_id: str) -> None:
        if adapter_id == HELD:
            reached.set()
            release.wait(60)

    config = EngineConfig(
        model_path=model_path,
        port=0,
        kv_cache_tokens=2048,
        max_lora_rank=8,
        adapter_dir=adapter_root,
        adapter_preload_threads=2,
        adapter_wait_s=adapter_wait_s,
    )
    parts = build_engine(config, before_adapter_read=before_read)
    try:
        with running_engine(config, parts) as running:
            assert reached.wait(30), "the preload never reached the held adapter"
            yield running, release
    finally:
        release.set()


def generate(running: RunningEngine, adapter: str, metadata=()):
    return running.generate(
        inference_pb2.GenerateRequest(
            adapter=adapter,
            token_ids=inference_pb2.TokenIds(ids=PROMPT),
            sampling=inference_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        ),
        metadata=metadata,
    )


def listed(running: RunningEngine) -> set[str]:
    adapters = running.admin.ListAdapters(admin_pb.ListAdaptersRequest()).adapters
    return {a.adapter_id for a in adapters}


def test_serving_while_preloading_and_a_request_waits_for_its_adapter(
    tiny_llama31_path, adapter_root
):
    expected = hf_greedy(hf_model(tiny_llama31_path, adapter_root / HELD), PROMPT, NEW_TOKENS)
    with engine_with_held_load(tiny_llama31_path, adapter_root, 60.0) as (running, release):
        health = health_pb2_grpc.HealthStub(running.channel).Check(
            health_pb2.HealthCheckRequest(service="")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # --max-loras was left at 0 (auto): the CPU keeps 8 slots, and says so.
        info = running.admin.GetEngineInfo(admin_pb.GetEngineInfoRequest())
        assert info.max_loras == running.parts.engine.snapshot().max_loras == 8
        # The quick ones finish beside the held one; the base model serves meanwhile.
        assert generate(running, "a-quick").completion_tokens == NEW_TOKENS
        assert generate(running, "c-quick").completion_tokens == NEW_TOKENS
        assert generate(running, "").completion_tokens == NEW_TOKENS
        assert listed(running) == {"a-quick", "c-quick"}
        assert not running.parts.preloader.wait(0)

        results: list = []
        waiting = threading.Thread(target=lambda: results.append(generate(running, HELD)))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not results  # waiting, not refused
        release.set()
        waiting.join(60)
        assert results and results[0].token_ids == expected
        assert running.parts.preloader.wait(30)
        assert listed(running) == {"a-quick", HELD, "c-quick"}


def test_a_request_past_the_wait_is_told_to_retry(tiny_llama31_path, adapter_root):
    with engine_with_held_load(tiny_llama31_path, adapter_root, 0.2) as (running, release):
        with pytest.raises(grpc.RpcError) as caught:
            generate(running, HELD)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "still being loaded" in caught.value.details()
        assert "retry" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:  # an unknown name is not "loading"
            generate(running, "never-there")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        release.set()
        assert running.parts.preloader.wait(30)
        assert generate(running, HELD).completion_tokens == NEW_TOKENS


def test_a_tenant_key_is_not_told_an_adapter_is_preloading(tiny_llama31_path, adapter_root):
    """Preloaded adapters have no tenant, so a tenant's key gets the NOT_FOUND sentence
    for one still loading at once, the same as for a name that never existed: waiting
    (or UNAVAILABLE) would tell it the adapter exists."""
    key_id, secret, api_key = new_key()
    with engine_with_held_load(tiny_llama31_path, adapter_root, 30.0) as (running, release):
        entry = admin_pb.ApiKeyEntry(key_id=key_id, secret_hash=hash_secret(secret), tenant="t")
        running.admin.SyncApiKeys(admin_pb.SyncApiKeysRequest(generation=1, keys=[entry]))
        keyed = [("authorization", f"Bearer {api_key}")]
        answers = []
        for name in (HELD, "never-there"):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                generate(running, name, metadata=keyed)
            assert time.monotonic() - started < 5.0  # not a wait for the preload
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            answers.append(caught.value.details().replace(repr(name), "NAME"))
        assert answers[0] == answers[1]
        release.set()


@pytest.mark.gpu
def test_auto_max_loras_on_cuda_is_sized_from_free_memory(tiny_llama31_path):
    """A tiny model's slots are small: auto reaches the cap; the engine reports it."""
    config = EngineConfig(
        model_path=tiny_llama31_path,
        device="cuda",
        dtype="bfloat16",
        port=0,
        gpu_memory_fraction=0.05,
        cuda_graphs=False,
    )
    parts = build_engine(config)
    assert parts.config.max_loras == AUTO_MAX_LORAS == parts.info().max_loras
    assert parts.engine.runner.lora_pool.max_loras == AUTO_MAX_LORAS
