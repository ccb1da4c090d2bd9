"""The `loraplex` command. Each subcommand builds its component's frozen config from
its flags and runs it; a flag's default is the config field's, or the LORAPLEX_*
variable `loraplex.environment` reads."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from control_plane.cli import add_commands as add_control_plane_commands
from engine.config import EngineConfig, resolve_device, resolve_dtype
from engine.model.default_model import DEFAULT_MODEL, resolve_model_path
from loraplex import environment
from loraplex.keys import check_admin_token
from loraplex.up import add_command as add_up_command


def _engine_serve(args: argparse.Namespace) -> int:
    from engine.server.app import build_engine, serve

    use_kernel_cache(Path(args.cache_dir))
    try:
        config = _engine_config(args)
        parts = build_engine(config)
    except (ValueError, RuntimeError, OSError) as exc:  # bad flags, model folder or adapter
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def ready(port: int) -> None:
        print(
            f"loraplex engine ready on {config.host}:{port} "
            f"({config.model_path.name}, {config.device}, {config.dtype})",
            flush=True,
        )

    # The engine loop shares the GIL with the gRPC event loop. When a step's device work
    # finishes, the loop thread must get the GIL back quickly: Python's default 5 ms
    # switch interval would let a busy event loop hold it for most of a decode step.
    sys.setswitchinterval(0.0005)
    try:
        asyncio.run(serve(config, on_ready=ready, parts=parts))
    except KeyboardInterrupt:
        pass
    except (RuntimeError, OSError) as exc:  # a port already taken (grpc raises RuntimeError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def use_kernel_cache(models_cache: Path) -> None:
    """Points Triton's kernel cache (read when it first compiles, which building the
    engine does) at `models_cache`/.triton-cache unless TRITON_CACHE_DIR is set, so an
    engine restarted on the same models cache (a volume in the compose file and the Helm
    chart) finds its kernels compiled. Triton's default is under $HOME, which a new
    container or pod starts without; on an H200 a cold compile made an 8B engine reach
    SERVING ~14 s later. A folder that cannot be written leaves Triton's default."""
    if environment.triton_cache_dir():
        return
    folder = models_cache / ".triton-cache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if os.access(folder, os.W_OK):
        os.environ["TRITON_CACHE_DIR"] = str(folder)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    check_admin_token(args.admin_token)
    device = resolve_device(args.device)
    return EngineConfig(
        model_path=resolve_model_path(args.model, Path(args.cache_dir)),
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        block_size=args.block_size,
        gpu_memory_fraction=args.gpu_memory_fraction,
        kv_cache_tokens=args.kv_cache_tokens,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_mixed_prefill_tokens=args.max_mixed_prefill_tokens,
        max_wait_steps=args.max_wait_steps,
        max_num_waiting=args.max_num_waiting,
        max_tenant_requests=args.max_requests_per_tenant,
        shutdown_grace_s=args.shutdown_grace,
        default_max_new_tokens=args.default_max_new_tokens,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        adapter_dir=Path(args.adapter_dir) if args.adapter_dir else None,
        adapter_preload_threads=args.adapter_preload_threads,
        adapter_wait_s=args.adapter_wait_s,
        adapter_roots=environment.adapter_roots(args.adapter_root),
        lora_backend=args.lora_backend,
        cuda_graphs=not args.no_cuda_graphs,
        mixed_graph_tokens=args.mixed_graph_tokens,
        step_overlap=not args.no_step_overlap,
        frontend_process=args.frontend_process,
        admin_token=args.admin_token,
        control_plane=args.control_plane,
        advertise=args.advertise,
        key_table_ttl_s=args.key_table_ttl,
    )


def _generate(args: argparse.Namespace) -> int:
    from loraplex.client import ChatMessage, Client, LoraplexError

    prompt, messages = (
        (None, [ChatMessage("user", args.prompt)]) if args.chat else (args.prompt, None)
    )
    failure = ""  # a sentence when the engine failed the request after it started
    with Client(args.target, api_key=args.api_key) as client:
        try:
            for delta in client.generate(
                prompt,
                messages=messages,
                adapter=args.adapter,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed,
                timeout=args.timeout,
            ):
                print(delta.text, end="", flush=True)
                if delta.finish_reason is not None and delta.usage is not None:
                    print(
                        f"\n[{delta.finish_reason}: {delta.usage.prompt_tokens} prompt + "
                        f"{delta.usage.completion_tokens} completion tokens]",
                        file=sys.stderr,
                    )
                    failure = delta.error
        except LoraplexError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def _add_engine_commands(subparsers: argparse._SubParsersAction) -> None:
    engine = subparsers.add_parser("engine", help="run an inference engine")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    serve = engine_sub.add_parser("serve", help="serve a model over gRPC")
    serve.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a Hugging Face safetensors folder, or 'default' (SmolLM2-135M-Instruct)",
    )
    serve.add_argument("--cache-dir", default=str(environment.cache_dir()))
    serve.add_argument("--host", default=EngineConfig.host)
    serve.add_argument("--port", type=int, default=EngineConfig.port)
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=EngineConfig.metrics_port,
        help="serve Prometheus /metrics here (0 = off)",
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=EngineConfig.http_port,
        help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models) and the /health, /ready probes here (0 = off)",
    )
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda")
    serve.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    serve.add_argument("--block-size", type=int, default=EngineConfig.block_size)
    serve.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=EngineConfig.gpu_memory_fraction,
        help="share of free GPU memory for the KV cache",
    )
    serve.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=EngineConfig.kv_cache_tokens,
        help="KV cache capacity in tokens on the CPU",
    )
    serve.add_argument("--max-model-len", type=int, default=EngineConfig.max_model_len)
    serve.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    serve.add_argument(
        "--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens
    )
    serve.add_argument(
        "--max-mixed-prefill-tokens",
        type=int,
        default=EngineConfig.max_mixed_prefill_tokens,
        help="prompt tokens a step may carry while other streams decode (bounds their "
        "time between tokens when requests arrive)",
    )
    serve.add_argument(
        "--max-wait-steps",
        type=int,
        default=EngineConfig.max_wait_steps,
        help="steps a waiting request may be passed over before it goes first in line",
    )
    serve.add_argument(
        "--max-num-waiting",
        type=int,
        default=EngineConfig.max_num_waiting,
        help="queued requests beyond which Generate answers RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--max-requests-per-tenant",
        type=int,
        default=EngineConfig.max_tenant_requests,
        help="requests one tenant's keys may have queued or running; beyond it Generate "
        "answers RESOURCE_EXHAUSTED (other tenants are unaffected)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=EngineConfig.shutdown_grace_s,
        help="on SIGTERM: seconds the streams in flight may take to finish (health turns "
        "NOT_SERVING and new calls get UNAVAILABLE at once)",
    )
    serve.add_argument(
        "--default-max-new-tokens", type=int, default=EngineConfig.default_max_new_tokens
    )
    serve.add_argument(
        "--max-loras",
        type=int,
        default=EngineConfig.max_loras,
        help="adapter slots on the device (distinct adapters per batch); 0 = auto: on CUDA "
        "as many slots at --max-lora-rank as fit in 10%% of the device memory free after "
        "the model loads (at most 128; the KV cache gets what is left), on the CPU 8",
    )
    serve.add_argument("--max-lora-rank", type=int, default=EngineConfig.max_lora_rank)
    serve.add_argument(
        "--max-cpu-loras",
        type=int,
        default=EngineConfig.max_cpu_loras,
        help="idle adapters kept in host memory (adapters with requests in flight always are)",
    )
    serve.add_argument(
        "--adapter-dir",
        default="",
        help="preload every adapter folder under DIR in the background (folder name = id); "
        "the engine serves meanwhile",
    )
    serve.add_argument(
        "--adapter-preload-threads",
        type=int,
        default=EngineConfig.adapter_preload_threads,
        help="threads loading --adapter-dir",
    )
    serve.add_argument(
        "--adapter-wait-s",
        type=float,
        default=EngineConfig.adapter_wait_s,
        help="how long a request waits for its adapter while it is still being preloaded "
        "before UNAVAILABLE",
    )
    serve.add_argument(
        "--adapter-root",
        action="append",
        help="LoadAdapter may read only under these folders (repeatable; without one, "
        "LORAPLEX_ADAPTER_ROOTS, ':'-separated)",
    )
    serve.add_argument(
        "--lora-backend", default=EngineConfig.lora_backend, help="auto | triton | torch"
    )
    serve.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run every step eagerly instead of replaying captured CUDA graphs",
    )
    serve.add_argument(
        "--no-step-overlap",
        action="store_true",
        help="wait for each step before scheduling the next (by default, on CUDA, the "
        "next step is prepared and launched while the device runs the current one)",
    )
    serve.add_argument(
        "--frontend-process",
        choices=("auto", "on", "off"),
        default=EngineConfig.frontend_process,
        help="serve the public gRPC port from a front-end process of its own, so that "
        "streaming to many clients does not slow the engine loop (auto: on CUDA)",
    )
    serve.add_argument(
        "--mixed-graph-tokens",
        type=int,
        default=EngineConfig.mixed_graph_tokens,
        help="mixed steps (prompts beside decodes) of up to this many tokens replay CUDA "
        "graphs; 0 = off (default: --max-mixed-prefill-tokens + --max-num-seqs)",
    )
    serve.add_argument(
        "--admin-token",
        default=environment.admin_token(),
        help="EngineAdmin calls must carry it (32+ characters; LORAPLEX_ADMIN_TOKEN); "
        "without one EngineAdmin answers loopback callers only",
    )
    serve.add_argument(
        "--control-plane",
        default=environment.control_plane(),
        help="HOST:PORT of the control plane to register with",
    )
    serve.add_argument(
        "--advertise",
        default=EngineConfig.advertise,
        help="HOST:PORT the control plane dials back",
    )
    serve.add_argument(
        "--key-table-ttl",
        type=float,
        default=EngineConfig.key_table_ttl_s,
        help="seconds the API key table is trusted without word from the control plane; "
        "then keys are refused UNAVAILABLE until it answers again",
    )
    serve.set_defaults(func=_engine_serve)

    gen = subparsers.add_parser("generate", help="stream a completion from an engine")
    gen.add_argument("prompt")
    gen.add_argument("--target", default=f"{EngineConfig.host}:{EngineConfig.port}")
    gen.add_argument("--adapter", default="")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    gen.add_argument("--api-key", default=environment.api_key())
    gen.add_argument("--timeout", type=float, default=None, help="seconds the whole call may take")
    gen.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_engine_commands(subparsers)
    add_control_plane_commands(subparsers)
    add_up_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
