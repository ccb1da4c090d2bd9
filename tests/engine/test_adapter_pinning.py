"""A version is immutable as a whole: adapter_config.json is pinned like the weights,
and alpha and the scaled weights must be finite.

Real tiny Llama, real PEFT adapters; the status codes through a real engine server.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from engine.config import EngineConfig
from engine.formats.chunked_digest import chunked_sha256
from engine.formats.errors import AdapterFormatError
from engine.lora.errors import AdapterConflictError
from engine.lora.peft_format import load_adapter
from engine.lora.registry import AdapterRegistry
from engine.model.config import ModelConfig, load_model_config
from loraplex.v1 import engine_admin_pb2 as pb
from tests.adapter_factory import make_peft_adapter
from tests.engine_server import RunningEngine, running_engine

MAX_RANK = 8
TOKEN = "pinning-admin-token"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class Made:
    base: Path
    adapter: Path  # r=4, alpha=8 on q_proj and v_proj
    root: Path  # the engine's adapter root

    def copy(self) -> Path:
        """A fresh copy of the adapter under the root, free to be tampered with."""
        return Path(shutil.copytree(self.adapter, self.root / uuid.uuid4().hex[:8]))


@pytest.fixture(scope="module")
def made(tiny_llama31_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Made:
    work = tmp_path_factory.mktemp("pinning")
    adapter = make_peft_adapter(
        tiny_llama31_path, work / "adapter", r=4, alpha=8, target_modules=["q_proj", "v_proj"],
        seed=1,
    )  # fmt: skip
    return Made(tiny_llama31_path, adapter, work / "root")


@pytest.fixture(scope="module")
def model_config(made: Made) -> ModelConfig:
    return load_model_config(made.base)


@pytest.fixture(scope="module")
def engine(made: Made) -> Iterator[RunningEngine]:
    made.root.mkdir(exist_ok=True)
    config = EngineConfig(
        model_path=made.base, port=0, kv_cache_tokens=512, max_lora_rank=MAX_RANK,
        admin_token=TOKEN, adapter_roots=(made.root,),
    )  # fmt: skip
    with running_engine(config) as running:
        yield running


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def set_alpha_text(folder: Path, alpha: str) -> None:
    """Write lora_alpha as raw JSON text: `Infinity` and `1e999` are what a hostile
    file holds, and json.dumps would not write them as numbers."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] = "ALPHA"
    path.write_text(json.dumps(config).replace('"ALPHA"', alpha))


def load(
    engine: RunningEngine, adapter_id: str, folder: Path, **fields: str
) -> pb.LoadAdapterResponse:
    request = pb.LoadAdapterRequest(
        adapter_id=adapter_id, path=str(folder), tenant="acme", **fields
    )
    return engine.admin.LoadAdapter(request, metadata=ADMIN, timeout=30)


def refusal(engine: RunningEngine, adapter_id: str, folder: Path, **fields: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        load(engine, adapter_id, folder, **fields)
    return caught.value


def test_a_config_rewritten_after_registration_is_refused(
    engine: RunningEngine, made: Made
) -> None:
    folder = made.copy()
    weights_sha = sha256_of(folder / "adapter_model.safetensors")
    config_sha = sha256_of(folder / "adapter_config.json")
    reply = load(engine, "acme/a@1", folder, sha256=weights_sha, config_sha256=config_sha)
    assert reply.outcome == pb.LOAD_OUTCOME_LOADED
    rewrite_config(folder, lora_alpha=1e30)  # the same weights, a garbage scaling
    error = refusal(engine, "acme/a@2", folder, sha256=weights_sha, config_sha256=config_sha)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "adapter_config.json changed since registration" in error.details()
    assert "new version" in error.details()
    # What was loaded before the rewrite is untouched.
    listed = {a.adapter_id: a for a in engine.admin.ListAdapters(
        pb.ListAdaptersRequest(), metadata=ADMIN).adapters}  # fmt: skip
    assert "acme/a@2" not in listed and listed["acme/a@1"].alpha == 8
    # The same id named with another config is a conflict, whatever the file says now.
    error = refusal(engine, "acme/a@1", folder, sha256=weights_sha, config_sha256="0" * 64)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "different content" in error.details()
    assert engine.admin.EvictAdapter(pb.EvictAdapterRequest(adapter_id="acme/a@1"), metadata=ADMIN)


def test_weights_changed_after_registration_fail_the_chunked_check(
    engine: RunningEngine, made: Made
) -> None:
    folder = made.copy()
    weights = folder / "adapter_model.safetensors"
    registered = {
        "sha256": sha256_of(weights),
        "chunked_sha256": chunked_sha256(weights.read_bytes()),
    }
    reply = load(engine, "acme/c@1", folder, **registered)
    assert reply.outcome == pb.LOAD_OUTCOME_LOADED
    assert reply.adapter.sha256 == registered["sha256"]
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x01  # a low bit of the last weight: still a valid, finite file
    weights.unlink()  # a new inode, as a copy over the folder would make
    weights.write_bytes(data)
    error = refusal(engine, "acme/c@2", folder, **registered)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"chunked sha256 {chunked_sha256(data)}" in error.details()
    assert "new version" in error.details()
    assert engine.admin.EvictAdapter(pb.EvictAdapterRequest(adapter_id="acme/c@1"), metadata=ADMIN)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"chunked_sha256": "a" * 64}, "give both, or neither"),
        ({"sha256": "a" * 64, "chunked_sha256": "xyz"}, "is not 64 hex digits"),
    ],
)
def test_a_chunked_digest_that_cannot_be_registered_is_invalid_argument(
    engine: RunningEngine, made: Made, fields: dict[str, str], words: str
) -> None:
    error = refusal(engine, "acme/bad@1", made.copy(), **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.details()


@pytest.mark.parametrize(
    ("alpha", "what"),
    [("Infinity", "finite"), ("NaN", "finite"), ("1e999", "finite"), ("9" * 400, "finite")],
)
def test_a_non_finite_alpha_is_invalid_argument(
    engine: RunningEngine, made: Made, alpha: str, what: str
) -> None:
    folder = made.copy()
    set_alpha_text(folder, alpha)
    error = refusal(engine, "acme/inf", folder)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lora_alpha" in error.details() and what in error.details()


def test_an_alpha_that_overflows_the_scaled_weights_is_invalid_argument(
    engine: RunningEngine, made: Made
) -> None:
    folder = made.copy()
    rewrite_config(folder, lora_alpha=1e300)  # finite, but B * alpha/r is Inf in float32
    error = refusal(engine, "acme/huge", folder)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lora_B" in error.details() and "not finite" in error.details()
    assert "lora_alpha" in error.details()
    rewrite_config(folder, alpha_pattern={"v_proj": 1e300})
    rewrite_config(folder, lora_alpha=8)
    error = refusal(engine, "acme/huge", folder)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "v_proj.lora_B" in error.details()
    # Other adapters keep loading.
    assert load(engine, "acme/fine", made.copy()).outcome == pb.LOAD_OUTCOME_LOADED


def test_scaled_weights_are_checked_in_the_serving_dtype(
    made: Made, model_config: ModelConfig
) -> None:
    folder = made.copy()
    rewrite_config(folder, lora_alpha=1e7)  # B * 2.5e6: fine in float32, Inf in float16
    weights = load_adapter(folder, model_config, MAX_RANK, dtype=torch.float32)
    assert all(bool(torch.isfinite(b).all()) for _, b in weights.groups.values())
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(folder, model_config, MAX_RANK, dtype=torch.float16)
    assert caught.value.reason == "non_finite" and "torch.float16" in str(caught.value)


def test_the_config_hashed_is_the_config_parsed(made: Made, model_config: ModelConfig) -> None:
    folder = made.copy()
    weights = load_adapter(folder, model_config, MAX_RANK)
    assert weights.config_sha256 == sha256_of(folder / "adapter_config.json")
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(folder, model_config, MAX_RANK, expected_config_sha256="ab" * 32)
    assert caught.value.reason == "config_sha256_mismatch"


def test_a_re_read_from_disk_finds_the_config_it_was_loaded_with(
    made: Made, model_config: ModelConfig
) -> None:
    # No idle adapter stays in host memory: every use re-reads the files.
    registry = AdapterRegistry(model_config, MAX_RANK, 0, (made.root,))
    folder = made.copy()
    registry.load("acme/a@1", folder)  # no pin given: the engine pins what it read
    assert registry.weights("acme/a@1").alpha == 8
    rewrite_config(folder, lora_alpha=1e30)
    with pytest.raises(AdapterFormatError) as caught:
        registry.weights("acme/a@1")
    assert caught.value.reason == "config_sha256_mismatch"
    assert registry.resolve("acme/a@1").alpha == 8  # the record is what was validated
    with pytest.raises(AdapterConflictError):
        registry.load("acme/a@1", folder, sha256=registry.get("acme/a@1").sha256,
                      config_sha256=sha256_of(folder / "adapter_config.json"))  # fmt: skip
