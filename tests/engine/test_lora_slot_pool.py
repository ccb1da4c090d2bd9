"""The slot pool lays adapters out as the kernels expect, and the applier adds each
token's own adapter delta (PEFT's delta) to a mixed batch in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.lora.applier import MultiLoraApplier, fold_slot
from engine.lora.peft_format import LoraWeights, load_adapter
from engine.lora.slot_pool import GROUPS, SLICE_OF, LoraSlotPool
from engine.model.config import ModelConfig, load_model_config
from engine.model.loader import load_model
from engine.model.lora_hook import PROJECTION_GROUPS
from tests.adapter_factory import make_peft_adapter, make_tiny_llama, write_random_adapter
from tests.model_factory import PagedDriver

MAX_RANK = 8


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ModelConfig, LoraWeights, LoraWeights, Path, Path]:
    root = tmp_path_factory.mktemp("pool")
    base_dir = make_tiny_llama(root / "base")
    config = load_model_config(base_dir)
    dir_a = make_peft_adapter(
        base_dir, root / "a", r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=1
    )
    dir_b = make_peft_adapter(
        base_dir,
        root / "b",
        r=8,
        alpha=16,
        target_modules="all-linear",
        seed=2,
        rank_pattern={"k_proj": 3},
        layers_to_transform=None,
    )
    return (
        config,
        load_adapter(dir_a, config, MAX_RANK),
        load_adapter(dir_b, config, MAX_RANK),
        base_dir,
        dir_a,
    )


def expected_delta(
    weights: LoraWeights, config: ModelConfig, layer: int, group: str, x: torch.Tensor
) -> torch.Tensor:
    """The group's delta `[T, total_out]` from the per-module weights, untargeted = 0."""
    parts = []
    for proj in PROJECTION_GROUPS[group]:
        module = weights.modules.get((layer, proj))
        if module is None:
            parts.append(torch.zeros(x.shape[0], config.projection_shape(proj)[0]))
        else:
            a, b = module
            parts.append(x @ a.T @ b.T)
    return torch.cat(parts, dim=1)


def test_layout_and_zero_padding(setup) -> None:
    config, weights_a, weights_b, _, _ = setup
    pool = LoraSlotPool(config, max_loras=3, max_rank=MAX_RANK, dtype=torch.float32, device="cpu")
    pointers = {g: (pool.lora_a[g].data_ptr(), pool.lora_b[g].data_ptr()) for g in GROUPS}
    pool.load_into_slot(2, weights_a)
    pool.load_into_slot(0, weights_b)
    assert pool.slot_ranks.tolist() == [8, 0, 4]
    assert pool.slice_offsets["qkv"] == (0, 64, 96, 128)
    assert pool.slice_offsets["gate_up"] == (0, 128, 256)
    for group in GROUPS:
        assert (pool.lora_a[group].data_ptr(), pool.lora_b[group].data_ptr()) == pointers[group]
        assert not pool.lora_a[group][:, 1].any() and not pool.lora_b[group][:, 1].any()
    a_qkv, b_qkv = pool.layer_weights(0, "qkv")
    assert a_qkv.shape == (3, 3, MAX_RANK, 64) and b_qkv.shape == (3, 128, MAX_RANK)
    # Adapter A (rank 4, q and v only): k slice and rank padding stay zero.
    assert torch.equal(a_qkv[2, 0, :4], weights_a.modules[(0, "q_proj")][0])
    assert not a_qkv[2, 0, 4:].any() and not a_qkv[2, 1].any() and not b_qkv[2, :, 4:].any()
    assert torch.equal(b_qkv[2, 96:128, :4], weights_a.modules[(0, "v_proj")][1])
    assert not pool.lora_a["gate_up"][:, 2].any() and not pool.lora_b["down"][:, 2].any()
    # Adapter B: k_proj has rank 3 inside an rank-8 slot.
    assert not a_qkv[0, 1, 3:].any() and a_qkv[0, 1, :3].any()

    # Reusing a slot leaves nothing of the previous, larger adapter behind.
    pool.load_into_slot(0, weights_a)
    for group in GROUPS:
        assert torch.equal(pool.lora_a[group][:, 0], pool.lora_a[group][:, 2])
        assert torch.equal(pool.lora_b[group][:, 0], pool.lora_b[group][:, 2])
    pool.clear_slot(2)
    assert pool.slot_ranks.tolist() == [4, 0, 0]
    assert not any(pool.lora_a[g][:, 2].any() or pool.lora_b[g][:, 2].any() for g in GROUPS)
    with pytest.raises(IndexError):
        pool.load_into_slot(3, weights_a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_deltas(setup, dtype: torch.dtype) -> None:
    config, weights_a, weights_b, _, _ = setup
    pool = LoraSlotPool(config, max_loras=4, max_rank=MAX_RANK, dtype=dtype, device="cpu")
    pool.load_into_slot(3, weights_a)
    pool.load_into_slot(1, weights_b)
    token_slots = [3, 3, -1, 1, 1, 1, -1, 3]
    owners = {3: weights_a, 1: weights_b}
    applier = MultiLoraApplier(pool, token_slots, backend="torch")
    assert applier.meta.num_active
    generator = torch.Generator().manual_seed(0)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for layer in range(config.num_layers):
        for group in GROUPS:
            in_features = pool.in_features[group]
            total_out = pool.slice_offsets[group][-1]
            x = torch.randn(len(token_slots), in_features, generator=generator).to(dtype)
            out = torch.randn(len(token_slots), total_out, generator=generator).to(dtype)
            before = out.clone()
            applier.apply(layer, group, x, out)
            for t, slot in enumerate(token_slots):
                if slot < 0:
                    assert torch.equal(out[t], before[t])
                    continue
                delta = expected_delta(owners[slot], config, layer, group, x[t : t + 1].float())
                torch.testing.assert_close(out[t].float(), before[t].float() + delta[0], **tol)


def test_applier_matches_peft_projections(setup) -> None:
    """End to end for one layer: base qkv GEMM + applier == PEFT's q/k/v outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, weights_a, _, base_dir, dir_a = setup
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), dir_a
    )
    attn = model.base_model.model.model.layers[1].self_attn
    pool = LoraSlotPool(config, max_loras=2, max_rank=MAX_RANK, dtype=torch.float32, device="cpu")
    pool.load_into_slot(1, weights_a)
    x = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(5))
    weight = torch.cat(
        [
            attn.q_proj.get_base_layer().weight,
            attn.k_proj.weight,
            attn.v_proj.get_base_layer().weight,
        ]
    )
    with torch.no_grad():
        out = x @ weight.T  # [T, q + 2 kv] fused base projection
        MultiLoraApplier(pool, [1, -1, 1], backend="torch").apply(1, "qkv", x, out)
        expected = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=1)
        base_only = x @ weight.T
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], base_only[1])


def test_no_adapter_batch_is_a_no_op(setup) -> None:
    config, weights_a, _, _, _ = setup
    pool = LoraSlotPool(config, max_loras=2, max_rank=MAX_RANK, dtype=torch.float32, device="cpu")
    pool.load_into_slot(0, weights_a)
    applier = MultiLoraApplier(pool, [-1, -1], backend="torch")
    assert not applier.meta.num_active
    out = torch.randn(2, 128)
    before = out.clone()
    applier.apply(0, "qkv", torch.randn(2, 64), out)
    assert torch.equal(out, before)


def per_module_slot(
    pool: LoraSlotPool, slot: int, weights: LoraWeights
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Slot `slot` as the old per-module load wrote it: zeros, then every float32 module
    cast into its rows; on the pool's device and in its dtype."""
    expected = {
        g: (torch.zeros_like(pool.lora_a[g][:, slot]), torch.zeros_like(pool.lora_b[g][:, slot]))
        for g in GROUPS
    }
    for (layer, proj), (a, b) in weights.modules.items():
        group, index = SLICE_OF[proj]
        begin, end = pool.slice_offsets[group][index : index + 2]
        expected[group][0][layer, index, : a.shape[0]] = a.to(pool.device, pool.dtype)
        expected[group][1][layer, begin:end, : b.shape[1]] = b.to(pool.device, pool.dtype)
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_from_the_packed_image_equals_the_per_module_copy(setup, dtype: torch.dtype) -> None:
    """A slot filled from an image packed in the pool's dtype holds exactly what the
    per-module copy of the float32 weights did, including over a larger adapter."""
    config, weights_a, weights_b, _, dir_a = setup
    pool = LoraSlotPool(config, max_loras=2, max_rank=MAX_RANK, dtype=dtype, device="cpu")
    pool.load_into_slot(1, weights_b)  # rank 8, every projection
    pool.load_into_slot(1, load_adapter(dir_a, config, MAX_RANK, dtype=dtype))  # rank 4, q and v
    for group, (a, b) in per_module_slot(pool, 1, weights_a).items():
        assert torch.equal(pool.lora_a[group][:, 1], a), group
        assert torch.equal(pool.lora_b[group][:, 1], b), group
    assert pool.slot_ranks.tolist() == [0, 4]


@pytest.mark.gpu
def test_cuda_async_load_matches_cpu(setup) -> None:
    config, weights_a, weights_b, _, _ = setup
    cpu = LoraSlotPool(config, max_loras=3, max_rank=MAX_RANK, dtype=torch.bfloat16, device="cpu")
    gpu = LoraSlotPool(config, max_loras=3, max_rank=MAX_RANK, dtype=torch.bfloat16, device="cuda")
    for pool, a, b in ((cpu, weights_a, weights_b), (gpu, weights_a.pinned(), weights_b.pinned())):
        pool.load_into_slot(0, b)
        pool.load_into_slot(2, a)
        pool.load_into_slot(1, b)
        pool.clear_slot(1)
    handle = gpu.load_into_slot(1, weights_a.pinned())
    cpu.load_into_slot(1, weights_a)
    gpu.wait_pending()
    torch.cuda.synchronize()
    assert handle.done()
    assert gpu.slot_ranks.tolist() == cpu.slot_ranks.tolist() == [8, 4, 4]
    for group in GROUPS:
        assert torch.equal(gpu.lora_a[group].cpu(), cpu.lora_a[group])
        assert torch.equal(gpu.lora_b[group].cpu(), cpu.lora_b[group])
    token_slots = [0, 2, -1, 1, 0]
    x = torch.randn(len(token_slots), 64).to(torch.bfloat16)
    out_cpu = torch.randn(len(token_slots), 128).to(torch.bfloat16)
    out_gpu = out_cpu.cuda()
    MultiLoraApplier(cpu, token_slots, backend="torch").apply(1, "qkv", x, out_cpu)
    MultiLoraApplier(gpu, token_slots).apply(1, "qkv", x.cuda(), out_gpu)
    torch.testing.assert_close(out_gpu.cpu().float(), out_cpu.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_slot_from_pinned_packed_image_equals_per_module_copy_at_8b_shapes(
    setup, tmp_path: Path
) -> None:
    """Llama-3.1-8B projection shapes (4 layers), bf16: a slot loaded asynchronously from
    the pinned packed image equals the per-module copy of the float32 weights, also when
    it replaces a larger adapter; the neighbouring slots are untouched."""
    import dataclasses

    config = dataclasses.replace(
        setup[0],
        hidden_size=4096,
        intermediate_size=14336,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        num_layers=4,
    )
    big = write_random_adapter(tmp_path / "r32", config, rank=32, seed=1)
    small = write_random_adapter(tmp_path / "r16", config, rank=16, seed=2)
    pool = LoraSlotPool(config, max_loras=3, max_rank=64, dtype=torch.bfloat16, device="cuda")
    images = {
        path: load_adapter(path, config, 64, dtype=torch.bfloat16, pin_memory=True)
        for path in (big, small)
    }
    assert all(t.is_pinned() for w in images.values() for pair in w.groups.values() for t in pair)
    pool.load_into_slot(0, images[small])
    pool.load_into_slot(1, images[big])
    pool.load_into_slot(2, images[big])
    handle = pool.load_into_slot(1, images[small])  # rank 16 over rank 32
    pool.wait_pending()
    torch.cuda.synchronize()
    assert handle.done() and pool.slot_ranks.tolist() == [16, 16, 32]
    for slot, path in ((0, small), (1, small), (2, big)):
        reference = load_adapter(path, config, 64)  # float32 modules
        for group, (a, b) in per_module_slot(pool, slot, reference).items():
            assert torch.equal(pool.lora_a[group][:, slot], a), (slot, group)
            assert torch.equal(pool.lora_b[group][:, slot], b), (slot, group)


def test_folded_shrink_gives_the_applier_logits(setup) -> None:
    """With a slot's A copied into the model's spare rows (`fold_slot`), a folded
    applier (one GEMM gives the base output and h; then only the expand) gives the plain
    applier's logits, for either adapter; the spare rows change nothing without LoRA."""
    config, weights_a, weights_b, base_dir, _ = setup
    plain_model = load_model(base_dir, dtype=torch.float32, device="cpu")
    model = load_model(base_dir, dtype=torch.float32, device="cpu", fold_rank=MAX_RANK)
    pool = LoraSlotPool(config, max_loras=3, max_rank=MAX_RANK, dtype=torch.float32, device="cpu")
    pool.load_into_slot(1, weights_b)
    pool.load_into_slot(2, weights_a)
    prompt = list(range(3, 12))
    base = PagedDriver(model).step([(0, prompt)])
    torch.testing.assert_close(base, PagedDriver(plain_model).step([(0, prompt)]))
    for slot in (1, 2):
        plain = MultiLoraApplier(pool, [slot] * len(prompt), backend="torch")
        expected = PagedDriver(model).step([(0, prompt)], plain)
        assert not torch.allclose(expected, base, atol=1e-3)  # the adapter matters
        fold_slot(model.layers, pool, slot)
        folded = MultiLoraApplier.from_meta(pool, plain.meta, "torch", plain.form, folded=True)
        got = PagedDriver(model).step([(0, prompt)], folded)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
