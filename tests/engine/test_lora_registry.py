"""The adapter registry: idempotent loads, names, in-flight eviction, the CPU LRU cache
(which never drops an adapter in use) and its re-read from disk, announced background
loads, and the adapter-root sandbox."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from engine.formats.errors import AdapterFormatError, AdapterOutsideRoots
from engine.lora.errors import (
    AdapterConflictError,
    AdapterEvictingError,
    AdapterLoadingError,
    AdapterNotFoundError,
)
from engine.lora.registry import AdapterRegistry
from engine.model.config import ModelConfig, load_model_config
from tests.adapter_factory import make_peft_adapter, make_tiny_llama

MAX_RANK = 8


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("made")
    base = make_tiny_llama(root / "base")
    out = {"base": base}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        out[name] = make_peft_adapter(
            base, root / name, r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=seed
        )
    return out


@pytest.fixture()
def roots(made: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh adapter root holding copies of adapters a, b, c."""
    root = tmp_path / "adapters"
    for name in ("a", "b", "c"):
        shutil.copytree(made[name], root / name)
    return root


@pytest.fixture(scope="module")
def config(made: dict[str, Path]) -> ModelConfig:
    return load_model_config(made["base"])


def registry(config: ModelConfig, root: Path, max_cpu_loras: int = 4, **kwargs) -> AdapterRegistry:
    return AdapterRegistry(config, MAX_RANK, max_cpu_loras, (root,), False, **kwargs)


def test_load_is_idempotent_and_conflicts_on_other_content(
    config: ModelConfig, roots: Path
) -> None:
    reg = registry(config, roots)
    outcome, record = reg.load("acme-a-v1", roots / "a", tenant="acme", aliases=("acme/a",))
    assert outcome == "loaded"
    assert (record.rank, record.alpha, record.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert record.in_cpu_cache and record.requests_in_flight == 0 and not record.evicting
    assert record.size_bytes == (roots / "a" / "adapter_model.safetensors").stat().st_size
    # With the checksum named the answer needs no disk read; the load declares the
    # whole alias set, so "acme/a" is released and free for another adapter.
    outcome, again = reg.load(
        "acme-a-v1", roots / "a", sha256=record.sha256, tenant="acme", aliases=("a-latest",)
    )
    assert outcome == "already_loaded" and again.aliases == ("a-latest",)
    assert reg.resolve("a-latest").adapter_id == "acme-a-v1"
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("acme/a")
    reg.load("acme-b-v1", roots / "b", tenant="acme", aliases=("acme/a",))
    assert reg.resolve("acme/a").adapter_id == "acme-b-v1"
    assert reg.load("acme-a-v1", roots / "a", tenant="acme")[1].aliases == ()
    with pytest.raises(AdapterConflictError, match="different content"):
        reg.load("acme-a-v1", roots / "b", tenant="acme")
    with pytest.raises(AdapterConflictError, match="different content"):
        reg.load("acme-a-v1", roots / "a", sha256="f" * 64, tenant="acme")
    with pytest.raises(AdapterConflictError, match="tenant"):
        reg.load("acme-a-v1", roots / "a", tenant="globex")
    with pytest.raises(AdapterFormatError) as exc:
        reg.load("acme-c-v1", roots / "b", sha256="0" * 64)
    assert exc.value.reason == "sha256_mismatch"
    assert [r.adapter_id for r in reg.list()] == ["acme-a-v1", "acme-b-v1"]


def test_aliases_resolve_and_never_collide(config: ModelConfig, roots: Path) -> None:
    reg = registry(config, roots)
    reg.load("a1", roots / "a", aliases=("acme/a",))
    assert reg.resolve("acme/a").adapter_id == reg.resolve("a1").adapter_id == "a1"
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        reg.resolve("nope")
    with pytest.raises(AdapterConflictError, match="alias 'acme/a' already names adapter 'a1'"):
        reg.load("b1", roots / "b", aliases=("acme/a",))
    with pytest.raises(AdapterConflictError, match="already names adapter 'a1'"):
        reg.load("b1", roots / "b", aliases=("a1",))
    with pytest.raises(AdapterConflictError, match="already an alias"):
        reg.load("acme/a", roots / "b")
    assert "b1" not in reg


def test_evict_waits_for_requests_in_flight(config: ModelConfig, roots: Path) -> None:
    dropped: list[str] = []
    reg = registry(config, roots, on_drop=dropped.append)
    reg.load("a1", roots / "a", aliases=("alias-a",))
    reg.acquire("alias-a")
    assert reg.acquire("a1").requests_in_flight == 2
    assert reg.evict("a1") == "evicted"
    record = reg.get("a1")
    assert record is not None and record.evicting and record.requests_in_flight == 2
    for refused in (reg.resolve, reg.acquire):
        with pytest.raises(AdapterEvictingError):
            refused("a1")
        with pytest.raises(AdapterNotFoundError, match="was evicted"):
            refused("alias-a")
    # The alias was released at once: another adapter takes it while a1 drains.
    reg.load("a2", roots / "b", aliases=("alias-a",))
    assert reg.resolve("alias-a").adapter_id == "a2"
    reg.evict("a2")
    assert reg.weights("a1").rank == 4  # admitted requests can still be placed
    assert reg.evict("a1") == "evicted"
    reg.release("a1")
    assert "a1" in reg and dropped == ["a2"]
    reg.release("a1")
    assert "a1" not in reg and dropped == ["a2", "a1"]
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("alias-a")
    assert reg.evict("a1") == "not_present"
    with pytest.raises(ValueError, match="without a matching acquire"):
        reg.release("a1")
    # Evicting an idle adapter drops it at once.
    reg.load("b1", roots / "b")
    assert reg.evict("b1") == "evicted" and dropped == ["a2", "a1", "b1"]


def test_reload_while_draining(config: ModelConfig, roots: Path) -> None:
    reg = registry(config, roots)
    reg.load("a1", roots / "a")
    reg.acquire("a1")
    reg.evict("a1")
    with pytest.raises(AdapterEvictingError, match="being evicted"):
        reg.load("a1", roots / "b")
    assert reg.load("a1", roots / "a")[0] == "loaded"
    assert reg.acquire("a1").requests_in_flight == 2


def test_cpu_cache_is_lru_and_rereads_from_disk(config: ModelConfig, roots: Path) -> None:
    reg = registry(config, roots, max_cpu_loras=2)
    for name in ("a", "b", "c"):
        reg.load(name, roots / name)
    cached = {r.adapter_id: r.in_cpu_cache for r in reg.list()}
    assert cached == {"a": False, "b": True, "c": True}
    reference = reg.weights("b")
    assert reg.weights("b") is reference  # served from memory
    fresh = reg.weights("a")  # re-read from disk, now most recent: "c" leaves
    assert {r.adapter_id: r.in_cpu_cache for r in reg.list()} == {"a": True, "b": True, "c": False}
    assert fresh.sha256 == reg.get("a").sha256
    # A file that changed on disk since it was loaded is refused on re-read.
    shutil.copy(
        roots / "b" / "adapter_model.safetensors", roots / "c" / "adapter_model.safetensors"
    )
    with pytest.raises(AdapterFormatError) as exc:
        reg.weights("c")
    assert exc.value.reason == "sha256_mismatch"
    with pytest.raises(AdapterNotFoundError):
        reg.weights("missing")


def test_no_cpu_cache_reads_every_time(config: ModelConfig, roots: Path) -> None:
    reg = registry(config, roots, max_cpu_loras=0)
    reg.load("a", roots / "a")
    first, second = reg.weights("a"), reg.weights("a")
    assert first is not second and not reg.get("a").in_cpu_cache
    for key, (a, b) in first.modules.items():
        assert torch.equal(a, second.modules[key][0]) and torch.equal(b, second.modules[key][1])


def test_paths_must_stay_inside_the_roots(
    config: ModelConfig, roots: Path, made: dict[str, Path], tmp_path: Path
) -> None:
    reg = registry(config, roots)
    outside = tmp_path / "outside"
    shutil.copytree(made["a"], outside)
    with pytest.raises(AdapterOutsideRoots, match="outside the adapter roots"):
        reg.load("x", roots / ".." / "outside")
    os.symlink(outside, roots / "sneaky")
    with pytest.raises(AdapterOutsideRoots):
        reg.load("x", roots / "sneaky")
    assert isinstance(AdapterOutsideRoots("outside_roots", "x"), PermissionError)
    os.symlink(roots / "b", roots / "b-link")
    assert reg.load("b", roots / "b-link")[1].path == (roots / "b").resolve()
    with pytest.raises(AdapterFormatError, match="not a directory"):
        reg.load("y", roots / "does-not-exist")
    # Without roots any path is accepted.
    open_reg = AdapterRegistry(config, MAX_RANK, 2, (), False)
    assert open_reg.load("x", outside)[0] == "loaded"


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_files_linked_outside_the_roots_are_refused(
    config: ModelConfig, roots: Path, made: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """The folder lies inside a root, but one file the loader reads links out of it."""
    outside = tmp_path / "outside"
    shutil.copytree(made["a"], outside)
    evil = roots / "evil"
    shutil.copytree(made["a"], evil)
    (evil / name).unlink()
    os.symlink(outside / name, evil / name)
    reg = registry(config, roots)
    with pytest.raises(AdapterOutsideRoots, match=f"resolves to .*{name}, outside"):
        reg.load("evil", evil)
    assert "evil" not in reg
    # A link that stays inside the roots is fine.
    (evil / name).unlink()
    os.symlink(roots / "a" / name, evil / name)
    assert reg.load("evil", evil)[0] == "loaded"


def test_concurrent_loads_of_one_adapter(config: ModelConfig, roots: Path) -> None:
    reg = registry(config, roots)
    outcomes: list[str] = []
    lock = threading.Lock()

    def load() -> None:
        outcome, _ = reg.load("a", roots / "a")
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["already_loaded"] * 3 + ["loaded"]
    assert len(reg) == 1


def test_adapters_in_use_never_leave_the_host_cache(config: ModelConfig, roots: Path) -> None:
    """With room for one idle adapter, every adapter with requests in flight stays in
    memory (no disk read to fill its slot, even with its files gone) until released."""
    reg = registry(config, roots, max_cpu_loras=1)
    for name in ("a", "b", "c"):
        reg.load(name, roots / name)
    held = {}
    for name in ("a", "b"):
        reg.acquire(name)
        held[name] = reg.weights(name)
    reg.load("extra", roots / "c")  # a new idle adapter cannot push out those in use
    cached = {r.adapter_id: r.in_cpu_cache for r in reg.list()}
    assert cached == {"a": True, "b": True, "c": False, "extra": False}
    shutil.rmtree(roots / "a")
    assert reg.weights("a") is held["a"]  # served from memory, the files are gone
    reg.release("a")  # idle again and over the limit: it leaves, "b" is still in use
    assert {r.adapter_id for r in reg.list() if r.in_cpu_cache} == {"b"}
    with pytest.raises(AdapterFormatError):
        reg.weights("a")


def test_no_cpu_cache_still_holds_adapters_in_use(config: ModelConfig, roots: Path) -> None:
    reg = registry(config, roots, max_cpu_loras=0)
    reg.load("a", roots / "a")
    reg.acquire("a")
    first = reg.weights("a")
    assert reg.weights("a") is first and reg.get("a").in_cpu_cache
    reg.release("a")
    assert not reg.get("a").in_cpu_cache and reg.weights("a") is not first


def test_announced_adapters_are_loading_until_settled(config: ModelConfig, roots: Path) -> None:
    reg = registry(config, roots)
    reg.expect(["a", "b"])
    for name in ("a", "b"):
        with pytest.raises(AdapterLoadingError, match="still being loaded"):
            reg.resolve(name)
    reg.load("a", roots / "a")
    reg.settle("a")
    reg.settle("b")  # its load failed, say: now it is simply unknown
    assert reg.resolve("a").adapter_id == "a"
    with pytest.raises(AdapterNotFoundError):
        reg.acquire("b")
