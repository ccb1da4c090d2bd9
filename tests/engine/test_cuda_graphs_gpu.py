"""CUDA graphs on a real GPU: decode and mixed-step replays give exactly the eager tokens
for batches mixing five adapters and base rows at odd sizes (padded buckets), after slot
reloads between replays, and through the whole engine over gRPC (run through the device
tool).

float32 with TF32 off, so eager and graph differ only by summation order (a different
GEMM M, BGMV vs SGMV) and greedy tokens agree exactly; bf16 is checked by closeness.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine.cuda_graphs import DecodeGraphs
from engine.kv_cache import KVCache
from engine.lora.peft_format import load_adapter
from engine.lora.slot_pool import LoraSlotPool
from engine.mixed_graphs import MixedGraphs
from engine.model.loader import load_model
from engine.runner import ModelRunner
from tests.engine.decode_driver import ScheduledDriver

pytestmark = pytest.mark.gpu

NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN, MAX_SEQS, MAX_RANK = 512, 16, 512, 32, 16
ADAPTERS = [  # (rank, targets); the last one only ever arrives by a slot reload
    (8, "all-linear"),
    (3, ["q_proj", "v_proj"]),
    (16, ["gate_proj", "up_proj", "down_proj", "o_proj"]),
    (5, ["k_proj", "o_proj"]),
    (4, "all-linear"),
    (12, "all-linear"),
]


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import PreTrainedTokenizerFast

    from tests.adapter_factory import make_peft_adapter, make_tiny_llama
    from tests.engine.tokenizer_folders import byte_fallback_tokenizer_dir

    root = tmp_path_factory.mktemp("graphs-gpu")
    tokenizer_dir = byte_fallback_tokenizer_dir(root)
    vocab = len(PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir)))
    base = make_tiny_llama(
        root / "base",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=1024,
    )
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, base / item.name)
    adapters = [
        make_peft_adapter(base, root / f"a{i}", r=r, alpha=2 * r, target_modules=t, seed=i + 1)
        for i, (r, t) in enumerate(ADAPTERS)
    ]
    return base, adapters, root


def _runner(
    base: Path, adapter_dirs: list[Path], dtype: torch.dtype, graphs: bool, mixed_tokens: int = 0
):
    model = load_model(base, dtype=dtype, device="cuda", fold_rank=MAX_RANK)
    pool = LoraSlotPool(model.config, 8, MAX_RANK, dtype, "cuda")
    for slot, folder in enumerate(adapter_dirs[:5]):
        pool.load_into_slot(slot, load_adapter(folder, model.config, MAX_RANK))
    cache = KVCache(model.config, NUM_BLOCKS, BLOCK_SIZE, dtype, "cuda")
    decode_graphs = None
    if graphs:
        decode_graphs = DecodeGraphs(
            model,
            cache,
            pool,
            max_num_seqs=MAX_SEQS,
            max_model_len=MAX_MODEL_LEN,
            pad_block=NUM_BLOCKS - 1,
        )
        decode_graphs.capture()
        # Every bucket has base and BGMV graphs; buckets too small to share adapters no
        # SGMV; a lone row also the folded shrink.
        expected = {(size, v) for size in decode_graphs.sizes for v in ("base", "bgmv")}
        expected |= {(size, "sgmv") for size in decode_graphs.sizes if size >= 3}
        expected |= {(1, "fold")}
        assert set(decode_graphs.captured) == expected
    mixed_graphs = None
    if graphs and mixed_tokens:
        mixed_graphs = MixedGraphs(
            model,
            cache,
            pool,
            max_num_seqs=MAX_SEQS,
            max_model_len=MAX_MODEL_LEN,
            max_tokens=mixed_tokens,
            pad_block=NUM_BLOCKS - 1,
        )
        mixed_graphs.capture()
        assert len(mixed_graphs.captured) == 2 * len(mixed_graphs.sizes)
    runner = ModelRunner(model, cache, pool, "triton", decode_graphs, mixed_graphs)
    return runner, model.config


def _drivers(runners, num_seqs: int, seed: int) -> list[ScheduledDriver]:
    gen = torch.Generator().manual_seed(seed)
    vocab = runners[0].model.config.vocab_size
    drivers = [ScheduledDriver(r, NUM_BLOCKS - 1, seed=seed) for r in runners]
    for i in range(num_seqs):
        length = int(torch.randint(1, 120, (1,), generator=gen))
        prompt = torch.randint(3, vocab, (length,), generator=gen).tolist()
        slot = [0, 1, 2, 3, 4, -1][i % 6]  # five adapters and base rows
        for driver in drivers:
            driver.add(f"r{i}", prompt, slot)
    return drivers


@pytest.mark.parametrize("num_seqs", [3, 13, 32])
def test_replay_matches_eager_tokens_with_reloads(gpu_setup, num_seqs: int) -> None:
    base, adapter_dirs, _ = gpu_setup
    torch.backends.cuda.matmul.allow_tf32 = False
    eager, config = _runner(base, adapter_dirs, torch.float32, graphs=False)
    graphed, _ = _runner(base, adapter_dirs, torch.float32, graphs=True)
    drivers = _drivers([eager, graphed], num_seqs, seed=num_seqs)
    assert drivers[0].step() == drivers[1].step()  # prefill, eager in both
    assert graphed.decode_graphs.num_replays == 0
    reloaded = load_adapter(adapter_dirs[5], config, MAX_RANK)
    for step in range(10):
        if step == 4:  # a new adapter (new rank) into slot 1, between two replays
            for runner in (eager, graphed):
                runner.load_adapter(1, reloaded)
        if step == 7:  # slot 3 emptied; its rows move to base, a base row gets slot 2
            for runner, driver in zip((eager, graphed), drivers, strict=True):
                runner.lora_pool.clear_slot(3)
                for rid, req in driver.requests.items():
                    if req.adapter_slot == 3:
                        driver.set_slot(rid, -1)
                if num_seqs > 5:
                    driver.set_slot("r5", 2)
        tokens = [driver.step() for driver in drivers]
        assert tokens[0] == tokens[1], f"step {step}"
    # 32 rows share five adapters (SGMV); 3 or 13 rows hardly share them (BGMV).
    assert graphed.decode_graphs.replays == {"sgmv" if num_seqs == 32 else "bgmv": 10}


def test_lone_row_replays_the_folded_shrink(gpu_setup) -> None:
    """One sequence with an adapter decodes through the fold graph (its adapter's A in
    the model's spare rows) and gives the eager tokens, across a reload of its slot and
    a move to another slot, each of which the spare rows must follow."""
    base, adapter_dirs, _ = gpu_setup
    torch.backends.cuda.matmul.allow_tf32 = False
    eager, config = _runner(base, adapter_dirs, torch.float32, graphs=False)
    graphed, _ = _runner(base, adapter_dirs, torch.float32, graphs=True)
    drivers = _drivers([eager, graphed], 1, seed=5)  # r0 in slot 0
    assert drivers[0].step() == drivers[1].step()  # prefill, eager in both
    reloaded = load_adapter(adapter_dirs[5], config, MAX_RANK)
    for step in range(9):
        if step == 3:
            for runner in (eager, graphed):
                runner.load_adapter(0, reloaded)
        if step == 6:
            for driver in drivers:
                driver.set_slot("r0", 2)
        assert drivers[0].step() == drivers[1].step(), f"step {step}"
    assert graphed.decode_graphs.replays == {"fold": 9}


def test_rows_sharing_one_adapter_replay_sgmv(gpu_setup) -> None:
    """A decode batch where most rows share one adapter (segments longer than one
    16-row tile) replays the SGMV graph and gives the eager tokens."""
    base, adapter_dirs, _ = gpu_setup
    torch.backends.cuda.matmul.allow_tf32 = False
    eager, _ = _runner(base, adapter_dirs, torch.float32, graphs=False)
    graphed, _ = _runner(base, adapter_dirs, torch.float32, graphs=True)
    drivers = _drivers([eager, graphed], 30, seed=11)
    for driver in drivers:
        for i, rid in enumerate(driver.requests):
            driver.set_slot(rid, 4 if i % 10 == 9 else -1 if i % 10 == 8 else 0)
    assert drivers[0].step() == drivers[1].step()  # prefill, eager in both
    for step in range(5):
        assert drivers[0].step() == drivers[1].step(), f"step {step}"
    assert graphed.decode_graphs.replays == {"sgmv": 5}


def test_base_only_and_oversized_batches(gpu_setup) -> None:
    """All-base steps replay the base graph; a step beyond the largest bucket and a
    prefill step run eagerly."""
    base, adapter_dirs, _ = gpu_setup
    torch.backends.cuda.matmul.allow_tf32 = False
    eager, _ = _runner(base, adapter_dirs, torch.float32, graphs=False)
    graphed, _ = _runner(base, adapter_dirs, torch.float32, graphs=True)
    drivers = _drivers([eager, graphed], MAX_SEQS + 3, seed=7)
    for driver in drivers:
        for rid in driver.requests:
            driver.set_slot(rid, -1)
    small = [f"r{i}" for i in range(5)]
    assert drivers[0].step() == drivers[1].step()  # prefill of all 35
    for _ in range(3):
        assert drivers[0].step(small) == drivers[1].step(small)
    assert graphed.decode_graphs.num_replays == 3
    assert drivers[0].step() == drivers[1].step()  # 35 > 32 rows: eager
    assert graphed.decode_graphs.num_replays == 3


def test_mixed_replay_matches_eager_tokens(gpu_setup) -> None:
    """Requests arriving while others decode: every mixed step (new prompts, prompts over
    a cached prefix, decode rows, five adapters and base rows) replays a graph and gives
    the eager tokens, also after a slot reload; the decode steps after them (20 rows over
    five adapters) replay the SGMV decode graph; a step beyond the largest bucket runs
    eagerly."""
    base, adapter_dirs, _ = gpu_setup
    torch.backends.cuda.matmul.allow_tf32 = False
    eager, config = _runner(base, adapter_dirs, torch.float32, graphs=False)
    graphed, _ = _runner(base, adapter_dirs, torch.float32, graphs=True, mixed_tokens=256)
    drivers = _drivers([eager, graphed], 24, seed=3)
    arrivals = [f"r{i}" for i in range(24)]
    active: list[str] = []
    reloaded = load_adapter(adapter_dirs[5], config, MAX_RANK)
    fitting = 0  # mixed steps that fit the largest bucket
    for step in range(14):
        active += arrivals[2 * step : 2 * step + 2]  # two new prompts a step, then decode only
        if step == 5:
            for runner in (eager, graphed):
                runner.load_adapter(1, reloaded)
        fitting += step < 12 and drivers[1].batch(active).num_tokens <= 256
        tokens = [driver.step(list(active)) for driver in drivers]
        assert tokens[0] == tokens[1], f"step {step}"
    mixed, decode = graphed.mixed_graphs, graphed.decode_graphs
    assert mixed is not None and decode is not None
    assert fitting >= 8 and mixed.num_replays == fitting and decode.replays == {"sgmv": 2}
    lone = [f"r{i}" for i in range(5)]  # slots 0-4, one row each: BGMV
    assert drivers[0].step(lone) == drivers[1].step(lone)
    assert decode.replays == {"sgmv": 2, "bgmv": 1}
    for driver in drivers:  # a prompt of 300 tokens: beyond the 256-token bucket
        driver.add("long", list(range(3, 303)), 0)
    assert drivers[0].step() == drivers[1].step()
    assert mixed.num_replays == fitting


def test_bf16_replay_close_to_eager(gpu_setup) -> None:
    base, adapter_dirs, _ = gpu_setup
    eager, _ = _runner(base, adapter_dirs, torch.bfloat16, graphs=False)
    graphed, _ = _runner(base, adapter_dirs, torch.bfloat16, graphs=True)
    drivers = _drivers([eager, graphed], 13, seed=11)
    drivers[0].step()
    drivers[1].step()
    batch = drivers[1].batch()
    ref = eager._forward(drivers[0].batch())
    got = graphed.decode_graphs.run(batch.seqs)
    assert got is not None and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05)


# Prepares a runner with decode and mixed graphs over adapters (compile ahead, capture,
# eager warm-up) on a fresh process; prints the Triton compiles as [kernel, asked by the
# compile-ahead pass] pairs and the threads that loaded kernels onto the device.
_CAPTURE_AND_LIST_COMPILES = """
import json, sys, threading, torch
from triton import knobs
from engine.cuda_graphs import DecodeGraphs
from engine.kv_cache import KVCache
from engine.lora.peft_format import load_adapter
from engine.lora.slot_pool import LoraSlotPool
from engine.mixed_graphs import MixedGraphs
from engine.model.loader import load_model
from engine.runner import ModelRunner

compiles, loads = [], []
def record(*, fn, is_manual_warmup, **_):
    compiles.append((fn.name, is_manual_warmup))
    return False  # compile as usual
knobs.runtime.jit_cache_hook = record
hooks_loads = hasattr(knobs.runtime, "kernel_load_start_hook")
if hooks_loads:  # a kernel's load onto the device, and its launcher: on which thread
    knobs.runtime.kernel_load_start_hook = lambda *_: loads.append(threading.current_thread().name)

base, adapter, blocks, seqs, rank = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
model = load_model(base, dtype=torch.bfloat16, device="cuda", fold_rank=rank)
pool = LoraSlotPool(model.config, 4, rank, torch.bfloat16, "cuda")
pool.load_into_slot(0, load_adapter(adapter, model.config, rank))
cache = KVCache(model.config, blocks, 16, torch.bfloat16, "cuda")
args = dict(max_num_seqs=seqs, max_model_len=512, pad_block=blocks - 1)
decode = DecodeGraphs(model, cache, pool, **args)
mixed = MixedGraphs(model, cache, pool, max_tokens=256, **args)
ModelRunner(model, cache, pool, "triton", decode, mixed).prepare(blocks - 1)
print(json.dumps({"compiles": compiles, "loads": loads if hooks_loads else None}))
"""


def test_cold_capture_compiles_every_kernel_ahead(gpu_setup, tmp_path: Path) -> None:
    """On an empty Triton cache (a node's first start) the kernels of the decode and
    mixed graphs and of the eager warm-up all compile in one compile-ahead pass, on
    threads, and are loaded there with their launchers: no capture or warm-up run stops
    to compile or load one of its own (~0.5 s each, one after another)."""
    base, adapter_dirs, _ = gpu_setup
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    argv = [str(base), str(adapter_dirs[0]), str(NUM_BLOCKS), str(MAX_SEQS), str(MAX_RANK)]
    done = subprocess.run(
        [sys.executable, "-c", _CAPTURE_AND_LIST_COMPILES, *argv],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    compiles = seen["compiles"]
    assert [name for name, ahead in compiles if not ahead] == []
    if seen["loads"] is not None:  # each loaded (and its launcher built) on the threads
        assert seen["loads"] and {t.split("_")[0] for t in seen["loads"]} == {"triton-compile"}
    kernels = {name for name, _ in compiles}
    expected = {"_paged_decode_kernel", "_varlen_paged_kernel", "_rope_kernel"}
    expected |= {"_bgmv_shrink_kernel", "_sgmv_shrink_kernel", "_sgmv_expand_kernel"}
    assert expected <= kernels


def test_engine_over_grpc_same_tokens_with_and_without_graphs(gpu_setup) -> None:
    """The whole engine: 13 concurrent streams over five adapters and base rows give
    the same tokens with CUDA graphs as with --no-cuda-graphs, with overlapped steps
    (the default) as without, and as transformers + peft (float32); a small token
    budget makes long prompts prefill in chunks beside other streams' decode tokens
    (mixed steps); one KV block is reserved for graph padding."""
    from engine.config import EngineConfig
    from loraplex.v1 import inference_pb2
    from tests.engine_server import running_engine
    from tests.hf_reference import hf_greedy, hf_model

    base, adapter_dirs, root = gpu_setup
    torch.backends.cuda.matmul.allow_tf32 = False
    adapter_root = root / "served"
    if not adapter_root.exists():
        adapter_root.mkdir()
        for i, folder in enumerate(adapter_dirs[:5]):
            shutil.copytree(folder, adapter_root / f"ad{i}")
    gen = torch.Generator().manual_seed(5)
    names = ["ad0", "ad1", "ad2", "ad3", "ad4", ""]  # five adapters and the base model
    jobs = [
        (names[i % 6], torch.randint(3, 300, (5 + 7 * i,), generator=gen).tolist())
        for i in range(13)
    ]
    results = {}
    for graphs, overlap in ((False, False), (False, True), (True, False), (True, True)):
        config = EngineConfig(
            model_path=base,
            device="cuda",
            dtype="float32",
            port=0,
            gpu_memory_fraction=0.02,
            max_num_seqs=16,
            max_num_batched_tokens=48,
            max_loras=8,
            max_lora_rank=MAX_RANK,
            adapter_dir=adapter_root,
            adapter_roots=(adapter_root,),
            cuda_graphs=graphs,
            step_overlap=overlap,
        )
        with running_engine(config) as running:
            assert running.parts.engine.overlap == overlap
            out: dict[int, list[int]] = {}

            def run(i: int, running=running, out=out) -> None:
                adapter, prompt = jobs[i]
                request = inference_pb2.GenerateRequest(
                    adapter=adapter,
                    token_ids=inference_pb2.TokenIds(ids=prompt),
                    sampling=inference_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True),
                )
                out[i] = running.generate(request).token_ids

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            runner = running.parts.engine.runner
            scheduler = running.parts.engine.scheduler
            if graphs:
                assert runner.decode_graphs is not None and runner.decode_graphs.num_replays > 0
                assert runner.mixed_graphs is not None and runner.mixed_graphs.num_replays > 0
                assert scheduler.blocks.num_blocks == runner.kv_cache.num_blocks - 1
            else:
                assert runner.decode_graphs is None and runner.mixed_graphs is None
                assert scheduler.blocks.num_blocks == runner.kv_cache.num_blocks
            results[graphs, overlap] = out
    assert all(len(t) == 12 for t in results[True, True].values())
    for variant, out in results.items():
        assert out == results[True, True], variant
    adapter_of = {f"ad{i}": folder for i, folder in enumerate(adapter_dirs[:5])}
    for i, (adapter, prompt) in enumerate(jobs):
        reference = hf_model(base, adapter_of.get(adapter)).cuda()
        expected = hf_greedy(reference, prompt, 12)
        assert results[True, True][i] == expected, f"stream {i} ({adapter!r})"
