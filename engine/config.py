"""The engine's one frozen configuration, built once in `main()` from flags.

The field defaults are the flags' defaults too (`loraplex.cli` reads them from here), and
what follows from the settings alone is a property here rather than worked out where it
is used; what needs the loaded model or the device's free memory is `build_engine`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    device: str = "cpu"  # resolved: "cpu" or "cuda[:N]"
    dtype: str = "float32"  # resolved: float32 | bfloat16 | float16
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0  # Prometheus /metrics over HTTP on `host`; 0 = off
    # OpenAI-compatible HTTP API (/v1/...) and the /health, /ready probes on `host`; 0 = off
    http_port: int = 0
    block_size: int = 16
    # KV cache capacity: on CUDA a fraction of the memory free after loading the
    # model and adapter slots; on the CPU a number of tokens.
    gpu_memory_fraction: float = 0.85
    kv_cache_tokens: int = 16384
    max_model_len: int = 0  # 0 = the model's own limit, capped by the KV cache
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    # Prompt tokens a step may carry while other sequences decode: bounds the time
    # between tokens of running streams when new requests arrive. 2048, not less: on
    # an H200 a mixed step of an 8B model costs ~60 ms whether it carries 512 or 2048
    # prompt tokens (host-bound, bench/results/serving_h200.md), so W2 ran 1.6x faster.
    max_mixed_prefill_tokens: int = 2048
    max_wait_steps: int = 200  # steps a request may wait before it goes first in line
    max_num_waiting: int = 1024  # beyond this Generate answers RESOURCE_EXHAUSTED
    max_tenant_requests: int = 256  # in flight per tenant key, so no tenant fills the queue
    shutdown_grace_s: float = 30.0  # after SIGTERM, how long calls in flight may finish
    default_max_new_tokens: int = 256
    # Adapter slots on the device; 0 = auto (sized from free device memory, 8 on the CPU:
    # engine.server.app._num_lora_slots).
    max_loras: int = 0
    max_lora_rank: int = 64
    max_cpu_loras: int = 64  # idle adapters kept in host memory (adapters in use always are)
    adapter_dir: Path | None = None  # preloaded: every folder under it, folder name = id
    adapter_preload_threads: int = 4  # the --adapter-dir preload runs in the background
    # How long a Generate waits for an adapter still being preloaded, then UNAVAILABLE.
    adapter_wait_s: float = 30.0
    adapter_roots: tuple[Path, ...] = ()  # LoadAdapter may read only under these
    lora_backend: str = "auto"  # auto (triton on CUDA, torch on CPU) | triton | torch
    # Decode steps replay captured CUDA graphs (CUDA only; costs a few seconds at start
    # and one KV block reserved as scratch for padding rows).
    cuda_graphs: bool = True
    # Mixed steps (prompts beside decodes) of up to this many tokens replay CUDA graphs
    # too; None = the largest a mixed step can be, 0 = off (engine.mixed_graphs).
    mixed_graph_tokens: int | None = None
    # Schedule and launch each step while the device runs the one before (CUDA only;
    # engine.engine). Off: the host waits for every step before preparing the next.
    step_overlap: bool = True
    # The public gRPC port served by a front-end process of its own (engine.server.
    # frontend), so streaming messages do not take the GIL from the engine loop:
    # auto = on CUDA, on, off.
    frontend_process: str = "auto"
    admin_token: str = ""  # required by EngineAdmin when set
    control_plane: str = ""  # host:port of the control plane, "" = standalone
    advertise: str = ""  # address the control plane should dial back
    # Under a control plane: how long the last key table is trusted without word from
    # the control plane; then keys are refused UNAVAILABLE (a revocation may be missed).
    key_table_ttl_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_loras < 0 or self.adapter_preload_threads < 1:
            raise ValueError(
                "--max-loras must be 0 (auto) or positive and --adapter-preload-threads at "
                f"least 1, got {self.max_loras} and {self.adapter_preload_threads}"
            )
        if self.mixed_graph_tokens is not None and self.mixed_graph_tokens < 0:
            raise ValueError(
                f"--mixed-graph-tokens must be 0 (off) or positive, got {self.mixed_graph_tokens}"
            )
        if self.lora_backend not in ("auto", "triton", "torch"):
            raise ValueError(
                f"--lora-backend must be auto, triton or torch, got {self.lora_backend!r}"
            )
        if self.control_plane and not self.admin_token:
            # Without it anyone could push this engine's API key table.
            raise ValueError(
                "--control-plane needs --admin-token (or LORAPLEX_ADMIN_TOKEN), the same "
                "token the control plane uses"
            )
        if self.control_plane and self.adapter_dir is not None:
            # Its adapters would have no tenant, so no API key could use them, and the
            # control plane would not know them: it places tenants' adapters itself.
            raise ValueError(
                "--adapter-dir cannot be used with --control-plane: register adapters at the "
                "control plane (loraplex adapters register), which places them on engines"
            )
        if self.frontend_process not in ("auto", "on", "off"):
            raise ValueError(
                f"--frontend-process must be auto, on or off, got {self.frontend_process!r}"
            )
        if not self.key_table_ttl_s > 0:
            raise ValueError(f"--key-table-ttl must be positive, got {self.key_table_ttl_s}")

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def uses_frontend_process(self) -> bool:
        """`frontend_process` made concrete: auto = on CUDA."""
        if self.frontend_process == "auto":
            return self.on_cuda
        return self.frontend_process == "on"

    @property
    def resolved_lora_backend(self) -> str:
        """`lora_backend` with auto made concrete: Triton on CUDA, torch on the CPU."""
        if self.lora_backend != "auto":
            return self.lora_backend
        return "triton" if self.on_cuda else "torch"

    @property
    def lora_in_graphs(self) -> bool:
        """Whether steps with adapters may replay CUDA graphs: graphs asked for, on CUDA,
        with the Triton LoRA kernels (the torch backend's run eagerly)."""
        return self.cuda_graphs and self.on_cuda and self.resolved_lora_backend == "triton"

    @property
    def readable_adapter_roots(self) -> tuple[Path, ...]:
        """Where LoadAdapter may read: `adapter_roots`, and `adapter_dir` (its preload
        reads there); with none at all LoadAdapter reads nothing."""
        if self.adapter_dir is None:
            return self.adapter_roots
        return (*self.adapter_roots, self.adapter_dir)

    def mixed_graph_max_tokens(self, max_num_batched_tokens: int) -> int:
        """The largest mixed step replayed from a CUDA graph (0 = none), at most a step's
        `max_num_batched_tokens`: by default the largest a step with running decodes can
        be (its prompt-token cap plus one token per sequence)."""
        if self.mixed_graph_tokens is not None:
            return min(self.mixed_graph_tokens, max_num_batched_tokens)
        return min(self.max_mixed_prefill_tokens + self.max_num_seqs, max_num_batched_tokens)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {requested!r}")
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    if requested == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if requested not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {requested!r}")
    return requested
