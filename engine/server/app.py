"""Builds an engine from its config and serves it over gRPC.

`build_engine` wires the parts (model, KV cache, scheduler, runner, adapters, keys);
`serve` puts the Inference and EngineAdmin servicers, health and reflection on one
grpc.aio server, with `--http-port` the OpenAI-compatible HTTP API on the same loop
(both front ends share one `GenerationService`), and under a control plane keeps the
engine registered. `engine.server.probes` says what health reports when.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.attention import supports_decode_graphs
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.engine import EngineLoop
from engine.formats.checkpoint import model_fingerprint
from engine.kv_cache import KVCache, bytes_per_block, num_blocks_for_bytes
from engine.lora.layout import slot_bytes
from engine.lora.preload import AdapterPreloader
from engine.lora.registry import AdapterRegistry
from engine.lora.slot_pool import LoraSlotPool
from engine.metrics import EngineMetrics
from engine.mixed_graphs import MixedGraphs
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.model.loader import load_model
from engine.runner import ModelRunner
from engine.scheduler import Scheduler, SchedulerConfig
from engine.server.admin import EngineAdminServicer
from engine.server.auth import ApiKeyTable, KeyMetrics
from engine.server.control_link import ControlLinkConfig, run_control_link
from engine.server.frontend_link import FrontendConfig
from engine.server.frontend_process import FrontendProcess
from engine.server.generation import GenerationService
from engine.server.http_api import HttpApi
from engine.server.inference import InferenceServicer
from engine.server.probes import ServingState
from engine.server.validation import RequestLimits
from engine.tokenizer import Tokenizer
from loraplex.admin_token import engine_admin_check
from loraplex.metrics_http import serve_metrics
from loraplex.v1 import engine_admin_pb2, engine_admin_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# --max-loras 0 (auto) on CUDA: the slots may take this share of the device memory free
# after the model loads, up to this many slots; on the CPU the old fixed default.
AUTO_LORA_MEMORY_FRACTION = 0.10
AUTO_MAX_LORAS = 128
CPU_MAX_LORAS = 8


@dataclass
class EngineParts:
    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    engine: EngineLoop
    adapters: AdapterRegistry
    keys: ApiKeyTable
    limits: RequestLimits
    fingerprint: str
    boot_id: str
    metrics: EngineMetrics
    preloader: AdapterPreloader | None = None  # running: --adapter-dir loads in background

    def info(self) -> engine_admin_pb2.EngineInfo:
        """Engine facts; the loop's state from its published snapshot (any thread)."""
        snapshot = self.engine.snapshot()
        return engine_admin_pb2.EngineInfo(
            boot_id=self.boot_id,
            model_name=self.model_config.name,
            model_fingerprint=self.fingerprint,
            max_loras=self.config.max_loras,
            max_lora_rank=self.config.max_lora_rank,
            max_cpu_loras=self.config.max_cpu_loras,
            device=self.config.device,
            dtype=self.config.dtype,
            kv_blocks_total=snapshot.kv_blocks_total,
            kv_blocks_free=snapshot.kv_blocks_free,
            kv_block_size=self.config.block_size,
            max_model_len=self.limits.max_model_len,
            running_requests=snapshot.num_running,
            waiting_requests=snapshot.num_waiting,
            num_adapters=len(self.adapters.list()),
            architecture=self.model_config.architecture,
        )


def build_engine(
    config: EngineConfig, *, before_adapter_read: Callable[[str], None] | None = None
) -> EngineParts:
    """Loads the model and wires everything; returns with the `--adapter-dir` preload
    running in the background. `parts.config` is `config` with `max_loras` resolved.
    `before_adapter_read(adapter_id)` is the registry's hook (tests hold loads there)."""
    dtype = getattr(torch, config.dtype)
    tokenizer_load = _in_background(Tokenizer, config.model_path)
    start = time.perf_counter()
    # With LoRA graphs the projections get room for one adapter's A rows: lone
    # sequences' decode graphs fold their LoRA shrink into the base GEMMs.
    fold_rank = config.max_lora_rank if config.lora_in_graphs else 0
    model = load_model(config.model_path, dtype=dtype, device=config.device, fold_rank=fold_rank)
    log.info("loaded the model's weights in %.1f s", time.perf_counter() - start)
    model_config = model.config
    # Slots first, then the KV cache from the memory they leave.
    config = dataclasses.replace(config, max_loras=_num_lora_slots(config, model_config, dtype))
    pool = LoraSlotPool(model_config, config.max_loras, config.max_lora_rank, dtype, config.device)
    kv_cache = KVCache(
        model_config,
        _num_kv_blocks(config, model_config, dtype),
        config.block_size,
        dtype,
        config.device,
    )
    log.info(
        "KV cache of %d blocks of %d tokens (%.1f GiB), %d adapter slots (%.1f GiB)",
        kv_cache.num_blocks,
        config.block_size,
        kv_cache.nbytes() / 2**30,
        config.max_loras,
        config.max_loras * slot_bytes(model_config, config.max_lora_rank, dtype) / 2**30,
    )
    use_graphs = _uses_cuda_graphs(config, model, kv_cache)
    limits = _kv_limits(config, model_config, kv_cache, use_graphs)
    scheduler = _scheduler(config, limits)
    adapters = _adapter_registry(config, model_config, dtype, before_read=before_adapter_read)
    runner = _runner(config, model, kv_cache, pool, limits, use_graphs)
    tokenizer = tokenizer_load.result()
    metrics = EngineMetrics()
    engine = EngineLoop(
        scheduler,
        runner,
        tokenizer,
        adapter_weights=adapters.weights,
        release_adapter=adapters.release,
        metrics=metrics,
        overlap=config.step_overlap and config.on_cuda,
    )
    # An adapter that really left (evicted, last request done) frees its slot; wired
    # before the preload starts, so before any adapter can be dropped.
    adapters.on_drop = engine.forget_adapter
    metrics.watch(engine.snapshot, adapters, model_config.name)
    preloader = _start_preload(config, adapters)
    return EngineParts(
        config=config,
        model_config=model_config,
        tokenizer=tokenizer,
        engine=engine,
        adapters=adapters,
        keys=ApiKeyTable(
            enforcing=bool(config.control_plane),
            ttl_s=config.key_table_ttl_s if config.control_plane else None,
            metrics=KeyMetrics(metrics.registry),
        ),
        limits=RequestLimits(
            model_config.vocab_size, limits.max_model_len, config.default_max_new_tokens
        ),
        fingerprint=model_fingerprint(model_config, config.model_path),
        boot_id=uuid.uuid4().hex,
        metrics=metrics,
        preloader=preloader,
    )


def _in_background(fn: Callable[..., T], *args: object) -> Future[T]:
    """`fn(*args)` on a thread of its own. For the tokenizer: importing transformers'
    AutoTokenizer takes seconds (7 s of a 15 s restart on the H200 host) and needs no
    GPU, so it runs beside the weight load and graph capture instead of before them."""
    pool = ThreadPoolExecutor(1, thread_name_prefix=getattr(fn, "__name__", "background"))
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)  # the thread ends once `fn` has returned


@dataclass(frozen=True)
class _KvLimits:
    """What the KV cache leaves the scheduler and the requests."""

    num_blocks: int  # the scheduler's: with CUDA graphs all but the padding rows' scratch
    max_model_len: int
    max_num_batched_tokens: int


def _uses_cuda_graphs(config: EngineConfig, model: LlamaModel, kv_cache: KVCache) -> bool:
    """Whether steps replay captured CUDA graphs: asked for, on CUDA, with an attention
    backend that supports them and a KV block to spare as the padding rows' scratch."""
    return (
        config.cuda_graphs
        and config.on_cuda
        and supports_decode_graphs(model.attend)
        and kv_cache.num_blocks > 1
    )


def _kv_limits(
    config: EngineConfig, model_config: ModelConfig, kv_cache: KVCache, use_graphs: bool
) -> _KvLimits:
    # With CUDA graphs the last KV block is scratch for the padding rows of a replayed
    # decode bucket; the scheduler's allocator is given every block but that one.
    num_blocks = kv_cache.num_blocks - (1 if use_graphs else 0)
    capacity = num_blocks * config.block_size
    max_model_len = min(
        config.max_model_len or model_config.max_position_embeddings,
        model_config.sliding_window or capacity,
        capacity,
    )
    return _KvLimits(num_blocks, max_model_len, min(config.max_num_batched_tokens, capacity))


def _scheduler(config: EngineConfig, limits: _KvLimits) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=limits.max_num_batched_tokens,
            max_mixed_prefill_tokens=config.max_mixed_prefill_tokens,
            max_wait_steps=config.max_wait_steps,
            block_size=config.block_size,
            num_blocks=limits.num_blocks,
            max_loras=config.max_loras,
        )
    )


def _adapter_registry(
    config: EngineConfig,
    model_config: ModelConfig,
    dtype: torch.dtype,
    before_read: Callable[[str], None] | None,
) -> AdapterRegistry:
    return AdapterRegistry(
        model_config,
        max_rank=config.max_lora_rank,
        max_cpu_loras=config.max_cpu_loras,
        adapter_roots=config.readable_adapter_roots,
        pin_memory=config.on_cuda,
        dtype=dtype,
        before_read=before_read,
    )


def _runner(
    config: EngineConfig,
    model: LlamaModel,
    kv_cache: KVCache,
    pool: LoraSlotPool,
    limits: _KvLimits,
    use_graphs: bool,
) -> ModelRunner:
    """The model runner; with CUDA graphs they are captured and its eager path warmed up
    now, so no request waits on a capture or a compile."""
    lora_backend = config.resolved_lora_backend
    if not use_graphs:
        return ModelRunner(model, kv_cache, pool, lora_backend)
    pad_block = kv_cache.num_blocks - 1  # the padding rows of every graph write here
    graph_args = {
        "max_num_seqs": config.max_num_seqs,
        "max_model_len": limits.max_model_len,
        "pad_block": pad_block,
        "lora_graphs": config.lora_in_graphs,
    }
    decode_graphs = DecodeGraphs(model, kv_cache, pool, **graph_args)
    mixed_graphs = None  # unless `--mixed-graph-tokens 0`, mixed steps get graphs too
    if mixed_tokens := config.mixed_graph_max_tokens(limits.max_num_batched_tokens):
        mixed_graphs = MixedGraphs(model, kv_cache, pool, max_tokens=mixed_tokens, **graph_args)
    runner = ModelRunner(model, kv_cache, pool, lora_backend, decode_graphs, mixed_graphs)
    runner.prepare(pad_block)
    return runner


def _start_preload(config: EngineConfig, adapters: AdapterRegistry) -> AdapterPreloader | None:
    """The `--adapter-dir` preload, started in the background (None without one)."""
    if config.adapter_dir is None:
        return None
    preloader = AdapterPreloader(adapters, Path(config.adapter_dir), config.adapter_preload_threads)
    preloader.start()
    return preloader


def _num_lora_slots(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype) -> int:
    """`config.max_loras`, or for 0 (auto) as many slots at max_lora_rank as fit in
    AUTO_LORA_MEMORY_FRACTION of the free device memory (one more slot's worth is the
    pool's staging buffer), capped at AUTO_MAX_LORAS; CPU_MAX_LORAS on the CPU."""
    if config.max_loras > 0:
        return config.max_loras
    if not config.on_cuda:
        chosen = CPU_MAX_LORAS
    else:
        free, _total = torch.cuda.mem_get_info(torch.device(config.device))
        per_slot = slot_bytes(model_config, config.max_lora_rank, dtype)
        fit = int(free * AUTO_LORA_MEMORY_FRACTION) // per_slot - 1
        chosen = max(1, min(AUTO_MAX_LORAS, fit))
    log.info(
        "--max-loras auto: %d adapter slots at rank %d (%.2f GB)",
        chosen,
        config.max_lora_rank,
        chosen * slot_bytes(model_config, config.max_lora_rank, dtype) / 1e9,
    )
    return chosen


def _num_kv_blocks(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype) -> int:
    if not config.on_cuda:
        return max(1, config.kv_cache_tokens // config.block_size)
    free, _total = torch.cuda.mem_get_info(torch.device(config.device))
    budget = int(free * config.gpu_memory_fraction)
    blocks = num_blocks_for_bytes(model_config, config.block_size, dtype, budget)
    if blocks == 0:
        need = bytes_per_block(model_config, config.block_size, dtype)
        raise RuntimeError(f"no GPU memory left for the KV cache ({budget} bytes < {need})")
    return blocks


async def _watch_engine_loop(
    engine: EngineLoop, state: ServingState, link: asyncio.Task | None
) -> None:
    """Once the engine loop thread has died: health says NOT_SERVING (ready and alive)
    and the engine stops heartbeating, so the control plane stops placing adapters on it."""
    while engine.is_alive():
        await asyncio.sleep(1.0)
    log.error("the engine loop has stopped; reporting NOT_SERVING")
    await state.engine_stopped()
    if link is not None:
        link.cancel()


async def _drain(service: GenerationService, state: ServingState, grace_s: float) -> None:
    """SIGTERM: report not ready, refuse new calls (gRPC and HTTP), let the calls in
    flight finish for up to `grace_s` seconds (then the engine stops and ends them as
    cancelled)."""
    log.info("draining: %d calls in flight, up to %.0f s", service.num_in_flight, grace_s)
    await state.draining()
    service.start_draining()
    deadline = asyncio.get_running_loop().time() + grace_s
    while service.num_in_flight and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


async def serve(
    config: EngineConfig,
    on_ready: Callable[[int], None] | None = None,
    parts: EngineParts | None = None,
) -> None:
    """Serves until cancelled, or until SIGTERM (in the main thread), which drains first.
    `on_ready(port)` runs once the port is bound."""
    parts = parts or await asyncio.to_thread(build_engine, config)
    service = GenerationService(
        parts.engine,
        parts.tokenizer,
        parts.limits,
        parts.adapters,
        parts.keys,
        parts.metrics,
        max_waiting=config.max_num_waiting,
        max_tenant_requests=config.max_tenant_requests,
        adapter_wait_s=config.adapter_wait_s,
    )
    server, state = _grpc_server(config, parts, service)
    # With a front end, this server is its EngineAdmin backend, on loopback only.
    address = "127.0.0.1:0" if config.uses_frontend_process else f"{config.host}:{config.port}"
    port = server.add_insecure_port(address)  # raises if taken
    stop_metrics = _start_metrics(config, parts)
    parts.engine.start()
    http = frontend = None
    try:
        http = await _start_http(config, parts, service, state)  # raises OSError if taken
        await server.start()
        if config.uses_frontend_process:
            frontend = await _start_frontend(config, service, state, port)  # OSError too
            port = frontend.port
    except OSError:
        if http is not None:
            await http.stop()
        await server.stop(grace=None)
        parts.engine.stop()
        raise
    await state.serving()
    log.info("engine serving on %s:%d", config.host, port)
    link = _start_control_link(config, parts, port)
    watch = asyncio.create_task(_watch_engine_loop(parts.engine, state, link))
    if on_ready is not None:
        on_ready(port)
    try:
        await _until_sigterm(frontend)  # or the task is cancelled (Ctrl-C, tests)
        await _drain(service, state, config.shutdown_grace_s)
    finally:
        watch.cancel()
        if parts.preloader is not None:
            parts.preloader.stop()
        await state.stopped()
        if link is not None:
            link.cancel()
        if stop_metrics is not None:
            stop_metrics()
        if http is not None:
            await http.stop()
        if frontend is not None:
            await frontend.stop()
        await server.stop(grace=1)
        parts.engine.stop()


def _grpc_server(
    config: EngineConfig, parts: EngineParts, service: GenerationService
) -> tuple[grpc.aio.Server, ServingState]:
    """The gRPC server with Inference, EngineAdmin, health and reflection, not yet bound."""
    # gRPC shares a taken port by default (SO_REUSEPORT): a second engine would silently
    # split the traffic. Binding must fail instead.
    server = grpc.aio.server(
        interceptors=[engine_admin_check(config.admin_token)],
        options=[("grpc.so_reuseport", 0)],
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(service), server)
    engine_admin_pb2_grpc.add_EngineAdminServicer_to_server(
        EngineAdminServicer(
            parts.engine,
            parts.adapters,
            parts.keys,
            parts.info,
            require_tenant=bool(config.control_plane),
        ),
        server,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
        engine_admin_pb2.DESCRIPTOR.services_by_name["EngineAdmin"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    return server, ServingState(parts.engine, health_servicer)


async def _start_frontend(
    config: EngineConfig, service: GenerationService, state: ServingState, engine_port: int
) -> FrontendProcess:
    """The front-end process on the public port (raises OSError if it is taken); it
    mirrors this engine's health from now on."""
    frontend = await FrontendProcess.start(
        FrontendConfig(
            host=config.host,
            port=config.port,
            engine_target=f"127.0.0.1:{engine_port}",
            admin_token=config.admin_token,
        ),
        service,
    )
    state.mirror = frontend.set_health
    log.info("front-end process serving %s:%d", config.host, frontend.port)
    return frontend


def _start_metrics(config: EngineConfig, parts: EngineParts) -> Callable[[], None] | None:
    """Prometheus /metrics with `--metrics-port`; returns what stops it."""
    if not config.metrics_port:
        return None
    stop = serve_metrics(parts.metrics.registry, config.host, config.metrics_port)
    log.info("engine metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    return stop


async def _start_http(
    config: EngineConfig, parts: EngineParts, service: GenerationService, state: ServingState
) -> HttpApi | None:
    """The OpenAI-compatible HTTP API with `--http-port`; raises OSError if it is taken."""
    if not config.http_port:
        return None
    http = HttpApi(service, state, parts.model_config.name, parts.metrics.registry)
    await http.start(config.host, config.http_port)
    log.info("OpenAI-compatible API on http://%s:%d/v1", config.host, config.http_port)
    return http


def _start_control_link(config: EngineConfig, parts: EngineParts, port: int) -> asyncio.Task | None:
    """Under a control plane: the task that registers the engine and keeps it registered."""
    if not config.control_plane:
        return None
    return asyncio.create_task(
        run_control_link(
            ControlLinkConfig(
                control_plane=config.control_plane,
                advertise=config.advertise or f"{config.host}:{port}",
                admin_token=config.admin_token,
            ),
            parts.info,
            key_table=parts.keys,  # heartbeats report when each key was last used
        )
    )


async def _until_sigterm(frontend: FrontendProcess | None) -> None:
    """Returns on SIGTERM. Raises RuntimeError if the front-end process ends first: the
    public port is gone, so this engine must be restarted (its supervisor does that)."""
    waits = [asyncio.create_task(_sigterm().wait())]
    if frontend is not None:
        waits.append(asyncio.create_task(frontend.wait_exited()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    if frontend is not None and frontend.exited:
        raise RuntimeError(
            f"the front-end process serving port {frontend.port} exited with code "
            f"{frontend.exit_code}; restart this engine"
        )


def _sigterm() -> asyncio.Event:
    """Set on SIGTERM; signals reach only the main thread, so elsewhere never set."""
    terminate = asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate.set)
    return terminate
