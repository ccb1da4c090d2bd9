"""Time an adapter's way from disk to a device slot, for a Llama-3.1-8B-shaped rank-16
adapter on all seven projections (84 MB in bf16). Meant for the GPU; on a machine
without CUDA the host-side rows still run (pageable memory, no slot row).

    python bench/bench_adapter_load.py --out bench/results/adapter_load_h200.json

Rows (page cache warm, median of `--repeats`):
- read + sha256: the file read once with its hash beside it (engine.lora.hashed_read),
  into a fresh buffer, then into a reused one (`ReadBuffers`), then checked against its
  registered chunked sha256 (chunks hashed on threads), then with its digest already
  known (`DigestCache`: no hash) into a reused one.
- disk -> host: `load_adapter` into the packed bf16 image, pinned on CUDA: `_hashed` with
  the digest cache emptied before each load (a file's first load), else a reload of a
  file whose digest is known (an evicted adapter, or one folder under two ids). The
  first pinned load is reported apart: later ones reuse page-locked blocks from torch's
  host allocator, a real preload mostly cannot.
- `_chunked`: a file's first load checked against its registered chunked sha256
  (`engine.formats.chunked_digest`, chunks hashed on threads) instead of hashed whole.
- the same loads packed by torch's whole intra-op team (`_team`: `this_thread_only`
  replaced by a no-op, the code before it), interleaved with the rows above so that a
  shared machine's drift hits both alike.
- host -> slot: `LoraSlotPool.load_into_slot` from the pinned image into a pool at
  `--max-lora-rank`, CUDA events around the copy and `wait_pending`, median of 20.
- preload N threads: `AdapterPreloader` over `--adapters` folders into a registry that
  keeps all of them, with the host allocator and the digest cache emptied first; wall
  time until the last is loaded. The folders hold copies of the one file (each read
  hits the page cache, each file is hashed), or with `--preload-files links` hard links
  of it (one inode: hashed once, then its digest is known). `--threads ""` skips these.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_decode_step import LLAMA_31_8B  # noqa: E402

from engine import cpu_threads  # noqa: E402
from engine.formats.chunked_digest import file_digests  # noqa: E402
from engine.lora import peft_format  # noqa: E402
from engine.lora.hashed_read import (  # noqa: E402
    READ_BUFFERS,
    VERIFIED_DIGESTS,
    DigestCache,
    read_hashed,
)
from engine.lora.peft_format import load_adapter  # noqa: E402
from engine.lora.preload import AdapterPreloader  # noqa: E402
from engine.lora.registry import AdapterRegistry  # noqa: E402
from engine.lora.slot_pool import LoraSlotPool  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from tests.adapter_factory import write_random_adapter  # noqa: E402


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_median_ms(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each run, the runs taken in turn `repeats` times."""
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(t) for key, t in times.items()}


def slot_load_ms(pool: LoraSlotPool, image, repeats: int) -> float:
    times = []
    for i in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pool.load_into_slot(i % pool.max_loras, image)
        pool.wait_pending()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def preload_s(config: ModelConfig, root: Path, threads: int, max_rank: int, cuda: bool) -> float:
    if cuda:
        torch._C._host_emptyCache()  # every image of this run pays for its page-locking
    VERIFIED_DIGESTS.clear()  # every file of this run is hashed on its first load
    count = len(list(root.iterdir()))
    registry = AdapterRegistry(
        config, max_rank, max_cpu_loras=count, pin_memory=cuda, dtype=torch.bfloat16
    )
    preloader = AdapterPreloader(registry, root, threads)
    start = time.perf_counter()
    preloader.start()
    preloader.wait()
    elapsed = time.perf_counter() - start
    assert len(registry) == count, f"only {len(registry)} of {count} adapters loaded"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-lora-rank", type=int, default=64, help="the pool's slot rank")
    parser.add_argument("--layers", type=int, default=LLAMA_31_8B.num_layers)
    parser.add_argument("--adapters", type=int, default=100, help="folders to preload")
    parser.add_argument("--threads", default="1,4,8", help="preload thread counts to time")
    parser.add_argument("--preload-files", choices=("copies", "links"), default="copies")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    config = dataclasses.replace(LLAMA_31_8B, num_layers=args.layers)
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="adapter-load-"))
    try:
        folder = write_random_adapter(workdir / "one", config, args.rank)
        path = folder / "adapter_model.safetensors"
        file_mb = path.stat().st_size / 1e6
        results: dict[str, float] = {}

        # A digest is remembered only for a file whose ctime is settle_ns old (any later
        # write then stamps a newer one): wait that long after writing it.
        time.sleep(VERIFIED_DIGESTS.settle_ns / 1e9)
        read_hashed(path).sha256()  # the page cache is warm from here on

        registered = file_digests(path)  # as the control plane registers them

        def read_and_release(digests: DigestCache | None, chunked: bool = False) -> None:
            read = read_hashed(path, digests, registered=registered if chunked else None)
            read.sha256()
            read.release()

        results["read_sha256_ms"] = median_ms(
            lambda: read_hashed(path, None, None).sha256(), args.repeats
        )
        results["read_sha256_reused_buffer_ms"] = median_ms(
            lambda: read_and_release(None), args.repeats
        )
        results["read_chunked_check_ms"] = median_ms(
            lambda: read_and_release(None, chunked=True), args.repeats
        )
        results["read_known_digest_ms"] = median_ms(
            lambda: read_and_release(VERIFIED_DIGESTS), args.repeats
        )

        expected = {"expected_sha256": registered[0], "expected_chunked_sha256": registered[1]}

        def load(pin: bool, hashed: bool = False, team: bool = False, chunked: bool = False):
            if hashed:
                VERIFIED_DIGESTS.clear()
            packing = (
                mock.patch.object(peft_format, "this_thread_only", contextlib.nullcontext)
                if team
                else contextlib.nullcontext()
            )
            with packing:
                return load_adapter(
                    folder, config, args.max_lora_rank, dtype=torch.bfloat16, pin_memory=pin,
                    **(expected if chunked else {}),
                )  # fmt: skip

        def loads(memory: str) -> dict[str, Callable[[], object]]:
            pin = memory == "pinned"
            return {
                f"disk_to_host_{memory}_hashed_ms": lambda: load(pin, hashed=True),
                f"disk_to_host_{memory}_chunked_ms": lambda: load(pin, True, chunked=True),
                f"disk_to_host_{memory}_ms": lambda: load(pin),
                f"disk_to_host_{memory}_hashed_team_ms": lambda: load(pin, True, team=True),
                f"disk_to_host_{memory}_team_ms": lambda: load(pin, team=True),
            }

        results.update(interleaved_median_ms(loads("pageable"), args.repeats))
        if cuda:
            start = time.perf_counter()
            image = load(True)
            results["disk_to_host_pinned_first_ms"] = (time.perf_counter() - start) * 1e3
            results.update(interleaved_median_ms(loads("pinned"), args.repeats))
            pool = LoraSlotPool(config, 4, args.max_lora_rank, torch.bfloat16, "cuda")
            slot_load_ms(pool, image, 3)  # warm-up
            results["host_to_slot_ms"] = slot_load_ms(pool, image, 20)
            results["host_to_slot_gb_per_s"] = image.nbytes / results["host_to_slot_ms"] / 1e6
            del pool, image
        READ_BUFFERS.clear()

        thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
        root = workdir / "many"
        root.mkdir()
        for i in range(args.adapters if thread_counts else 0):
            target = root / f"adapter-{i:03d}"
            target.mkdir()
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                if args.preload_files == "links":
                    os.link(folder / name, target / name)
                else:
                    shutil.copyfile(folder / name, target / name)
        if thread_counts and args.preload_files == "links":
            time.sleep(VERIFIED_DIGESTS.settle_ns / 1e9)  # linking stamped a new ctime
        for threads in thread_counts:
            key = f"preload_{args.adapters}_{args.preload_files}_threads_{threads}_s"
            results[key] = preload_s(config, root, threads, args.max_lora_rank, cuda)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"adapter: rank {args.rank}, {args.layers} layers, all 7 projections, {file_mb:.1f} MB")
    one = cpu_threads._omp_set_num_threads is not None
    print(f"torch intra-op threads: {torch.get_num_threads()}; one-thread pack available: {one}")
    print(f"{'measurement':<40} {'value':>10}")
    for key, value in results.items():
        print(f"{key:<40} {value:>10.2f}")
    if args.out is not None:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        record = {
            "command": " ".join(sys.argv),
            "machine": {
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                # False: the OpenMP runtime was not found, so both ways used the team.
                "one_thread_pack": cpu_threads._omp_set_num_threads is not None,
            },
            "commit": commit,
            "adapter_file_mb": file_mb,
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
