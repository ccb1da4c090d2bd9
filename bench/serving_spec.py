"""What the serving benchmark runs: model shapes, workload sizes, engine limits (presets),
and the bytes a decode step must read at least, computed from the model shape.

Torch-free: the bench process and its client processes import this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

HBM_BYTES_PER_S = 4.2e12  # H200 HBM3e peak read bandwidth: the floor's denominator
DTYPE_BYTES = 2  # bf16 weights, KV cache and adapters


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """`(out_features, in_features)` of each LoRA-targeted projection."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, inter = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (inter, h),
            "up_proj": (inter, h),
            "down_proj": (h, inter),
        }

    def weight_bytes_without_embedding(self) -> int:
        """Every weight a decode step reads: layers, final norm, untied lm_head."""
        per_layer = sum(o * i for o, i in self.projection_shapes().values()) + 2 * self.hidden_size
        params = self.num_layers * per_layer + self.hidden_size + self.vocab_size * self.hidden_size
        return params * DTYPE_BYTES

    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * DTYPE_BYTES

    def adapter_bytes(self, rank: int) -> int:
        """One adapter on all seven projections of every layer: A [r, in] + B [out, r]."""
        per_layer = sum(rank * (o + i) for o, i in self.projection_shapes().values())
        return self.num_layers * per_layer * DTYPE_BYTES


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelSpec
    device: str  # engine --device; fixtures are made on the GPU when this is cuda
    engine_dtype: str
    num_adapters: int
    lora_rank: int
    prompt_len: int
    max_new_tokens: int
    w1_requests: int
    w2_requests: int
    b1_repeats: int
    w3_rates: tuple[float, ...]  # requests/s, light to heavy
    w3_duration_s: float
    warmup_requests: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_cpu_loras: int
    max_loras: tuple[int, ...]  # default --max-loras list
    start_timeout_s: float  # spawn -> all adapters loaded
    client_procs: int  # default --client-procs
    num_shards: int


LLAMA_8B = ModelSpec(
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    bos_token_id=128000,
    eos_token_id=128001,
)

TINY = ModelSpec(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=512,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=2048,
)

PRESETS = {
    "8b": Preset(
        name="8b",
        model=LLAMA_8B,
        device="cuda",
        engine_dtype="bfloat16",
        num_adapters=100,
        lora_rank=16,
        prompt_len=128,
        max_new_tokens=128,
        w1_requests=32,
        w2_requests=1000,
        b1_repeats=3,
        w3_rates=(2.0, 8.0, 16.0),
        w3_duration_s=20.0,
        warmup_requests=8,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        max_cpu_loras=128,
        max_loras=(32, 100),
        start_timeout_s=420.0,
        client_procs=4,
        num_shards=4,
    ),
    "tiny": Preset(
        name="tiny",
        model=TINY,
        device="cpu",
        engine_dtype="float32",
        num_adapters=12,
        lora_rank=16,
        prompt_len=16,
        max_new_tokens=16,
        w1_requests=6,
        w2_requests=48,
        b1_repeats=3,
        w3_rates=(2.0, 5.0, 10.0),
        w3_duration_s=2.0,
        warmup_requests=2,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        max_cpu_loras=16,
        max_loras=(4,),
        start_timeout_s=120.0,
        client_procs=1,
        num_shards=2,
    ),
}


def fixture_spec(preset: Preset, seed: int) -> dict[str, object]:
    """What the cached fixtures depend on; a fixture folder is reused only when equal."""
    return {
        "version": 1,
        "seed": seed,
        "model": dataclasses.asdict(preset.model),
        "num_adapters": preset.num_adapters,
        "lora_rank": preset.lora_rank,
        "num_shards": preset.num_shards,
    }


def adapter_ids(num_adapters: int) -> list[str]:
    return [f"a{i:03d}" for i in range(num_adapters)]
