"""Issue 3 through real gRPC: many adapters in one batch equal transformers + peft token
for token; slot pressure; every rejection keeps the engine serving; eviction while
streaming; ListAdapters / GetEngineInfo tell the truth."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.formats.checkpoint import model_fingerprint
from engine.model.config import load_model_config
from engine.server.app import build_engine
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import inference_pb2
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import collect, running_engine
from tests.hf_reference import hf_greedy, hf_model

PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 253, 1345, 30],
    [1, 77, 9, 1000, 2000, 3000],
    [1, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52],
]
NEW_TOKENS = 10

# Five adapters: different ranks (one odd), target subsets, one rsLoRA, per-layer subsets.
ADAPTERS = {
    "acme-all": dict(
        r=8,
        alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    ),
    "acme-odd": dict(r=3, alpha=6, target_modules=["q_proj", "v_proj"]),
    "beta-rslora": dict(r=16, alpha=8, target_modules="all-linear", use_rslora=True),
    "beta-mlp-layer0": dict(
        r=5, alpha=10, target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[0]
    ),
    "gamma-pattern": dict(
        r=4,
        alpha=4,
        target_modules=["k_proj", "o_proj"],
        rank_pattern={"o_proj": 7},
        alpha_pattern={"o_proj": 21},
    ),
}


@pytest.fixture(scope="module")
def adapter_root(tiny_llama31_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        make_peft_adapter(tiny_llama31_path, root / name, seed=seed + 1, **options)
    return root


@pytest.fixture(scope="module")
def expected(tiny_llama31_path, adapter_root) -> dict[tuple[str, int], list[int]]:
    """Greedy tokens of transformers + peft, each adapter alone, float32."""
    out = {}
    for name in [*ADAPTERS, ""]:
        model = hf_model(tiny_llama31_path, adapter_root / name if name else None)
        for i, prompt in enumerate(PROMPTS):
            out[(name, i)] = hf_greedy(model, prompt, NEW_TOKENS)
    return out


def config_for(model_path: Path, adapter_root: Path, **overrides) -> EngineConfig:
    values = dict(
        model_path=model_path,
        device="cpu",
        dtype="float32",
        port=0,
        kv_cache_tokens=2048,
        max_loras=8,
        max_lora_rank=16,
        max_cpu_loras=8,
        adapter_roots=(adapter_root,),
    )
    values.update(overrides)
    return EngineConfig(**values)


def request(prompt: list[int], adapter: str = "", new_tokens: int = NEW_TOKENS):
    return inference_pb2.GenerateRequest(
        adapter=adapter,
        token_ids=inference_pb2.TokenIds(ids=prompt),
        sampling=inference_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
    )


def load(running, adapter_id: str, path: Path, **fields) -> admin_pb.LoadAdapterResponse:
    return running.admin.LoadAdapter(
        admin_pb.LoadAdapterRequest(adapter_id=adapter_id, path=str(path), **fields)
    )


def run_concurrently(running, jobs: list[tuple[str, int]]) -> dict[tuple[str, int], list[int]]:
    results: dict[tuple[str, int], list[int]] = {}

    def run(job: tuple[str, int]) -> None:
        name, i = job
        results[job] = running.generate(request(PROMPTS[i], name)).token_ids

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def overlapped(config: EngineConfig, overlap: bool):
    """The engine of `config`, each step launched before the previous one is collected
    when `overlap` (what CUDA does; on the CPU a launch runs the step to the end, so
    this checks the bookkeeping: tokens fed from the step before, one token computed
    past a request's end, preemption and slot changes between launch and collect)."""
    parts = build_engine(config)
    parts.engine.overlap = overlap
    return running_engine(config, parts)


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_mixed_batch_of_adapters_matches_peft(tiny_llama31_path, adapter_root, expected, overlap):
    config = config_for(tiny_llama31_path, adapter_root, adapter_dir=adapter_root)
    with overlapped(config, overlap) as running:
        jobs = [(name, i) for name in [*ADAPTERS, ""] for i in range(len(PROMPTS))]
        results = run_concurrently(running, jobs)
        steps_with_many = running.parts.engine.snapshot().steps
    for job in jobs:
        assert results[job] == expected[job], job
    assert steps_with_many < len(jobs) * NEW_TOKENS  # the rows really shared steps


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_more_adapters_in_flight_than_slots(tiny_llama31_path, adapter_root, expected, overlap):
    config = config_for(tiny_llama31_path, adapter_root, adapter_dir=adapter_root, max_loras=2)
    with overlapped(config, overlap) as running:
        jobs = [(name, i) for name in ADAPTERS for i in range(2)]
        results = run_concurrently(running, jobs)
        assert running.parts.engine.snapshot().max_loras == 2
    for job in jobs:
        assert results[job] == expected[job], job


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_preempted_and_chunked_requests_match_peft(
    tiny_llama31_path, adapter_root, expected, overlap
):
    # 4 KV blocks for 9 requests of up to 2 blocks each: running requests are preempted
    # and recomputed; 8-token steps chunk every prompt and mix it with decodes.
    config = config_for(
        tiny_llama31_path,
        adapter_root,
        adapter_dir=adapter_root,
        kv_cache_tokens=64,
        max_num_seqs=6,
        max_num_batched_tokens=8,
        max_mixed_prefill_tokens=4,
    )
    with overlapped(config, overlap) as running:
        jobs = [(name, i) for name in ["acme-all", "gamma-pattern", ""] for i in range(3)]
        results = run_concurrently(running, jobs)
        preemptions = running.parts.metrics.registry.get_sample_value(
            "loraplex_engine_preemptions_total"
        )
    for job in jobs:
        assert results[job] == expected[job], job
    assert preemptions and preemptions > 0


@pytest.fixture(scope="module")
def engine_with_loads(tiny_llama31_path, adapter_root):
    with running_engine(config_for(tiny_llama31_path, adapter_root, max_lora_rank=8)) as running:
        yield running


def test_load_is_idempotent_and_aliases_resolve(engine_with_loads, adapter_root, expected):
    running = engine_with_loads
    path = adapter_root / "acme-all"
    first = load(running, "acme/all@1", path, tenant="acme", aliases=["acme/all"])
    again = load(running, "acme/all@1", path, tenant="acme", aliases=["acme/all"])
    assert first.outcome == admin_pb.LOAD_OUTCOME_LOADED
    assert again.outcome == admin_pb.LOAD_OUTCOME_ALREADY_LOADED
    assert first.adapter.rank == 8 and first.adapter.tenant == "acme"
    with pytest.raises(grpc.RpcError) as caught:
        load(running, "acme/all@1", adapter_root / "acme-odd")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert running.generate(request(PROMPTS[0], "acme/all")).token_ids == expected[("acme-all", 0)]
    with pytest.raises(grpc.RpcError) as caught:
        running.generate(request(PROMPTS[0], "acme/nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _bad_adapters(root: Path, good: Path, other_base: Path) -> dict[str, tuple[Path, dict, str]]:
    """name -> (folder, extra LoadAdapter fields, expected phrase)."""
    cases: dict[str, tuple[Path, dict, str]] = {}

    def variant(name: str, edit_config=None, edit_weights=None) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        if edit_config:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            edit_config(cfg)
            (folder / "adapter_config.json").write_text(json.dumps(cfg))
        if edit_weights:
            tensors = load_file(folder / "adapter_model.safetensors")
            edit_weights(tensors)
            save_file(tensors, folder / "adapter_model.safetensors")
        return folder

    cases["dora"] = (variant("dora", lambda c: c.update(use_dora=True)), {}, "DoRA")
    cases["modules_to_save"] = (
        variant("mts", lambda c: c.update(modules_to_save=["lm_head"])),
        {},
        "modules_to_save",
    )

    def add_embedding(t):
        t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 49152)

    cases["embedding target"] = (
        variant(
            "emb", lambda c: c.update(target_modules=["q_proj", "embed_tokens"]), add_embedding
        ),
        {},
        "embed_tokens",
    )

    def nan(t):
        key = next(k for k in t if k.endswith("lora_B.weight"))
        t[key][0, 0] = float("nan")

    cases["nan weights"] = (variant("nan", edit_weights=nan), {}, "NaN")
    truncated = variant("truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated file"] = (truncated, {}, "adapter_model.safetensors")
    missing = variant("missing")
    (missing / "adapter_model.safetensors").unlink()
    cases["missing file"] = (missing, {}, "adapter_model.safetensors")
    binary = variant("bin")
    (binary / "adapter_model.safetensors").rename(binary / "adapter_model.bin")
    cases["bin instead of safetensors"] = (binary, {}, "safetensors")
    cases["sha256 mismatch"] = (good, {"sha256": "0" * 64}, "sha256")
    cases["wrong base shapes"] = (other_base, {}, "shape")
    return cases


def test_every_rejection_is_clear_and_the_engine_keeps_serving(
    engine_with_loads, tiny_llama31_path, adapter_root, tmp_path, expected
):
    running = engine_with_loads
    other_base = tmp_path / "other-base"
    from tests.adapter_factory import make_tiny_llama

    make_tiny_llama(other_base, hidden_size=96, intermediate_size=160, vocab_size=49152)
    make_peft_adapter(
        other_base, adapter_root / "wrong-shapes", r=4, alpha=8, target_modules=["q_proj"], seed=9
    )
    cases = _bad_adapters(adapter_root, adapter_root / "acme-odd", adapter_root / "wrong-shapes")
    cases["rank above the limit"] = (adapter_root / "beta-rslora", {}, "rank")
    stream = running.inference.Generate(request(PROMPTS[1], "", new_tokens=40))
    first = next(stream)
    codes = {}
    for name, (folder, fields, phrase) in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            load(running, f"bad-{name}", folder, **fields)
        codes[name] = caught.value.code()
        assert caught.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,  # a file the folder lacks
        ), name
        assert phrase.lower() in caught.value.details().lower(), (name, caught.value.details())
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "acme-odd", outside)
    with pytest.raises(grpc.RpcError) as caught:
        load(running, "escape", adapter_root / ".." / outside.name)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The stream in flight was not disturbed and the engine still serves adapters.
    rest = collect(stream)
    assert len(first.token_ids) + len(rest.token_ids) == 40
    assert codes["wrong base shapes"] == grpc.StatusCode.FAILED_PRECONDITION
    assert codes["missing file"] == grpc.StatusCode.NOT_FOUND
    load(running, "odd", adapter_root / "acme-odd")
    assert running.generate(request(PROMPTS[2], "odd")).token_ids == expected[("acme-odd", 2)]
    listed = {
        a.adapter_id for a in running.admin.ListAdapters(admin_pb.ListAdaptersRequest()).adapters
    }
    assert not any(name.startswith("bad-") for name in listed)


def test_evict_while_streaming_finishes_the_stream_and_refuses_new_requests(
    engine_with_loads, adapter_root, expected
):
    running = engine_with_loads
    load(running, "gamma", adapter_root / "gamma-pattern")
    full = running.generate(request(PROMPTS[0], "gamma", new_tokens=60)).token_ids
    stream = running.inference.Generate(request(PROMPTS[0], "gamma", new_tokens=60))
    first = next(stream)
    evicted = running.admin.EvictAdapter(admin_pb.EvictAdapterRequest(adapter_id="gamma"))
    assert evicted.outcome == admin_pb.EVICT_OUTCOME_EVICTED
    with pytest.raises(grpc.RpcError) as caught:
        running.generate(request(PROMPTS[0], "gamma"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # retry on another engine
    listing = running.admin.ListAdapters(admin_pb.ListAdaptersRequest()).adapters
    gamma = next(a for a in listing if a.adapter_id == "gamma")
    assert gamma.evicting and gamma.requests_in_flight == 1
    rest = collect(stream)
    assert list(first.token_ids) + rest.token_ids == full
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        listing = running.admin.ListAdapters(admin_pb.ListAdaptersRequest()).adapters
        if all(a.adapter_id != "gamma" for a in listing):
            break
        time.sleep(0.02)
    assert all(a.adapter_id != "gamma" for a in listing)
    with pytest.raises(grpc.RpcError) as caught:
        running.generate(request(PROMPTS[0], "gamma"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "was evicted" in caught.value.details()
    again = running.admin.EvictAdapter(admin_pb.EvictAdapterRequest(adapter_id="gamma"))
    assert again.outcome == admin_pb.EVICT_OUTCOME_NOT_PRESENT


def test_list_adapters_and_engine_info_tell_the_truth(
    engine_with_loads, tiny_llama31_path, adapter_root
):
    running = engine_with_loads
    load(running, "info-odd", adapter_root / "acme-odd", tenant="acme", aliases=["acme/odd"])
    running.generate(request(PROMPTS[0], "acme/odd", new_tokens=2))
    listing = {
        a.adapter_id: a for a in running.admin.ListAdapters(admin_pb.ListAdaptersRequest()).adapters
    }
    info = listing["info-odd"]
    assert (info.rank, info.tenant, list(info.aliases)) == (3, "acme", ["acme/odd"])
    assert info.residency == admin_pb.RESIDENCY_GPU  # it sits in a slot after use
    assert info.requests_in_flight == 0 and info.size_bytes > 0 and len(info.sha256) == 64
    assert sorted(info.target_modules) == ["q_proj", "v_proj"]
    engine = running.admin.GetEngineInfo(admin_pb.GetEngineInfoRequest())
    assert engine.max_loras == 8 and engine.max_lora_rank == 8 and engine.max_cpu_loras == 8
    assert engine.kv_blocks_free == engine.kv_blocks_total == 2048 // 16
    assert engine.running_requests == 0 and engine.num_adapters == len(listing)
    assert engine.model_fingerprint == model_fingerprint(
        load_model_config(tiny_llama31_path), tiny_llama31_path
    )
    assert len(engine.boot_id) == 32 and engine.device == "cpu"
