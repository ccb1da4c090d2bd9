"""The fused element-wise Triton kernels equal the torch code they replace.

On the CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by scripts/test.sh);
the gpu-marked test repeats the model-level check in bf16 on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import write_kv
from engine.model.config import ModelConfig
from engine.model.llama import rms_norm
from engine.model.rope import RotaryEmbedding

fused = pytest.importorskip("engine.kernels.fused")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _config(head_dim: int) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=4 * head_dim,
        intermediate_size=96,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attention_bias=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="tiny",
    )


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 96])  # 96: the block is wider than the row
def test_add_rms_norm_equals_torch(with_residual: bool, hidden: int) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=gen).to(DEVICE)
    residual = torch.randn(7, hidden, generator=gen).to(DEVICE) if with_residual else None
    weight = torch.randn(hidden, generator=gen).to(DEVICE)
    expected_sum = x + residual if residual is not None else x
    expected = rms_norm(expected_sum, weight, 1e-5)

    res = residual.clone() if residual is not None else None
    out = fused.add_rms_norm(x, res, weight, 1e-5)

    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if res is not None:
        torch.testing.assert_close(res, expected_sum, rtol=0, atol=0)


def test_add_rms_norm_reads_strided_rows() -> None:
    # The final norm reads rows picked out of a wider batch.
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 128, generator=gen).to(DEVICE)
    rows = wide[:, :64]
    weight = torch.randn(64, generator=gen).to(DEVICE)
    torch.testing.assert_close(
        fused.add_rms_norm(rows, None, weight, 1e-6), rms_norm(rows, weight, 1e-6)
    )


@pytest.mark.parametrize("head_dim", [32, 64])
def test_rope_in_place_and_cache_store_equal_torch(head_dim: int) -> None:
    config = _config(head_dim)
    rope = RotaryEmbedding(config, DEVICE)
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens, block_size = 9, 4
    # q, k, v as strided views of one fused qkv row, as the model hands them over.
    qkv = torch.randn(num_tokens, (4 + 2 + 2) * head_dim, generator=gen).to(DEVICE)
    positions = torch.randint(0, 256, (num_tokens,), generator=gen).to(DEVICE)
    q, k, v = qkv.split((4 * head_dim, 2 * head_dim, 2 * head_dim), dim=-1)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in (q, k, v))
    q_ref, k_ref = rope(q.clone(), k.clone(), positions)
    v_before = v.clone()
    # Shuffled, non-contiguous cache slots; NaN everywhere no token writes.
    kv_layer = torch.full((2, 8, block_size, 2, head_dim), float("nan"), device=DEVICE)
    slots = torch.randperm(8 * block_size, generator=gen)[:num_tokens].to(DEVICE)
    expected = kv_layer.clone()
    write_kv(expected, k_ref, v_before, slots)

    rope.rotate_and_store_(q, k, v, positions, kv_layer, slots)

    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)  # rotated where it was
    assert torch.equal(v, v_before)
    torch.testing.assert_close(kv_layer, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_launches_while_compiling_ahead_only_compile() -> None:
    """Inside `compiling_ahead()` a kernel launch is a compile request: the kernel does
    not run (here q stays unrotated and the cache unwritten), also after a block nested
    in it ends; after the outer block, launches run."""
    from engine.kernels.compile_ahead import compiling_ahead

    config = _config(32)
    rope = RotaryEmbedding(config, DEVICE)
    q, k, v = (torch.randn(3, 2, 32).to(DEVICE) for _ in range(3))
    positions = torch.tensor([1, 5, 9], device=DEVICE)
    kv_layer = torch.zeros(2, 4, 4, 2, 32, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    q_before = q.clone()
    with compiling_ahead() as compile_only:
        with compiling_ahead() as nested:
            assert nested == compile_only
        rope.rotate_and_store_(q, k, v, positions, kv_layer, slots)
    if not compile_only:
        pytest.skip("this Triton has no asynchronous compiles (before 3.4)")
    assert torch.equal(q, q_before) and not kv_layer.any()
    rope.rotate_and_store_(q, k, v, positions, kv_layer, slots)
    assert not torch.equal(q, q_before) and kv_layer.any()


@pytest.mark.parametrize("inter", [48, 1536])  # 1536: more than one column block
def test_silu_and_mul_equals_torch(inter: int) -> None:
    gen = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(5, 2 * inter, generator=gen).to(DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_empty_batches_launch_nothing() -> None:
    x = torch.empty(0, 64, device=DEVICE)
    assert fused.add_rms_norm(x, None, torch.ones(64, device=DEVICE), 1e-5).shape == (0, 64)
    assert fused.silu_and_mul(torch.empty(0, 64, device=DEVICE)).shape == (0, 32)


@pytest.mark.parametrize("kind", ["tiny_llama31_path", "tiny_qwen2_path"])
def test_model_with_fused_ops_equals_torch_model(kind: str, request: pytest.FixtureRequest) -> None:
    """A mixed step (a prefill chunk over cached context beside a fresh prompt) gives the
    same logits with the fused kernels as with the torch code, and so the same tokens."""
    from engine.model.loader import load_model
    from tests.model_factory import PagedDriver

    folder = request.getfixturevalue(kind)
    drivers = [
        PagedDriver(load_model(folder, torch.float32, DEVICE, fused_ops=fused_ops), block_size=4)
        for fused_ops in (False, True)
    ]
    steps = [[(0, [5, 9, 14, 3, 7])], [(0, [8, 2, 11]), (1, [4, 4, 19, 6])], [(0, [1]), (1, [2])]]
    for chunks in steps:
        plain, with_fused = (driver.step(chunks) for driver in drivers)
        torch.testing.assert_close(with_fused, plain, rtol=1e-4, atol=1e-4)
        assert with_fused.argmax(-1).tolist() == plain.argmax(-1).tolist()


@pytest.mark.gpu
def test_fused_kernels_in_bf16_at_llama_8b_shapes() -> None:
    """bf16 on CUDA at Llama-3.1-8B widths: each kernel within a bf16 ulp or two of the
    torch code it replaces (which rounds more often)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    t, hidden, inter, heads, kv_heads, dim = 96, 4096, 14336, 32, 8, 128

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    x, residual, weight = randn(t, hidden), randn(t, hidden), randn(hidden)
    res = residual.clone()
    normed = fused.add_rms_norm(x, res, weight, 1e-5)
    assert torch.equal(res, x + residual)
    torch.testing.assert_close(normed, rms_norm(x + residual, weight, 1e-5), rtol=2e-2, atol=2e-2)

    gate_up = randn(t, 2 * inter)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-2, atol=1e-2)

    config = _config(dim)
    rope = RotaryEmbedding(
        ModelConfig(**{**config.__dict__, "max_position_embeddings": 8192}), "cuda"
    )
    qkv = randn(t, (heads + 2 * kv_heads) * dim)
    positions = torch.randint(0, 8192, (t,), generator=gen, device="cuda")
    q, k, _ = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    q, k = q.view(t, heads, dim), k.view(t, kv_heads, dim)
    q_ref, k_ref = rope(q.clone(), k.clone(), positions)
    kv_layer = torch.zeros(2, t, 16, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(t, device="cuda") * 16  # the first slot of block t
    v = qkv[:, (heads + kv_heads) * dim :].view(t, kv_heads, dim)
    rope.rotate_and_store_(q, k, v, positions, kv_layer, slots)
    assert torch.equal(kv_layer[0, :, 0], k) and torch.equal(kv_layer[1, :, 0], v)
    torch.testing.assert_close(q, q_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(k, k_ref, rtol=2e-2, atol=2e-2)
