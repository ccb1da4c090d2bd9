"""The soak (bench/soak.py) in small: a real engine process on loopback, 16 streams over
4 adapters of 2 tenants for a few seconds, more adapters than slots and than the host
cache holds. Every request gets its full token count, and afterwards the engine is idle
again: nothing running or waiting, every KV block free, no adapter or slot held, and
each tenant can fill exactly its in-flight cap once more (a leaked count would refuse)."""

from __future__ import annotations

import secrets
from pathlib import Path

import grpc
import pytest

from bench.serving_engine import EngineProcess
from bench.soak_load import SoakPlan, burst, idle_state, is_idle, run_soak, set_up_fleet
from loraplex.v1 import engine_admin_pb2_grpc
from tests.adapter_factory import make_peft_adapter
from tests.property.checks import eventually

STREAMS, ADAPTERS, TENANTS = 16, 4, ("acme", "globex")
PER_TENANT = STREAMS // len(TENANTS)
MAX_NEW_TOKENS = 12


@pytest.mark.slow
def test_a_mini_soak_serves_every_token_and_returns_to_idle(
    tiny_llama31_path: Path, tmp_path: Path
) -> None:
    folders = [
        make_peft_adapter(
            tiny_llama31_path, tmp_path / f"a{i}", r=4, alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"], seed=i,
        )
        for i in range(ADAPTERS)
    ]  # fmt: skip
    token = secrets.token_hex(20)
    engine_args = [
        "--model", str(tiny_llama31_path), "--device", "cpu", "--kv-cache-tokens", "4096",
        "--max-loras", "2", "--max-cpu-loras", "2", "--max-lora-rank", "8",
        "--adapter-root", str(tmp_path), "--max-requests-per-tenant", str(PER_TENANT),
        "--admin-token", token,
    ]  # fmt: skip
    plan = SoakPlan(STREAMS, MAX_NEW_TOKENS, (4, 24), duration_s=8.0, vocab_size=49152)
    with EngineProcess(engine_args, tmp_path / "engine.log") as engine:
        engine.wait_serving(120)
        with grpc.insecure_channel(engine.target) as channel:
            admin = engine_admin_pb2_grpc.EngineAdminStub(channel)
            fleet = set_up_fleet(admin, token, folders, list(TENANTS))
            result = run_soak(engine.target, fleet, plan)

            failures = [r.error or r.finish for r in result.records if not r.complete]
            assert not failures, failures[:5]
            assert len(result.records) >= 2 * STREAMS  # each stream ran several requests
            assert {r.tenant for r in result.records} == set(TENANTS)

            assert eventually(lambda: is_idle(idle_state(admin, token, engine.scrape()))), (
                idle_state(admin, token, engine.scrape())
            )
            refill = burst(engine.target, fleet, PER_TENANT, plan)
            assert [r.error for r in refill if not r.complete] == []
            assert len(refill) == STREAMS
            assert eventually(lambda: is_idle(idle_state(admin, token, engine.scrape())))
