"""A file is read once with its sha256 beside it; a file this process has hashed is not
hashed again while its fstat identity is unchanged, and is whenever the file changes."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from engine.formats.chunked_digest import CHUNK_BYTES, chunked_sha256, file_digests
from engine.formats.errors import AdapterFormatError
from engine.lora import hashed_read
from engine.lora.hashed_read import (
    VERIFIED_DIGESTS,
    DigestCache,
    DigestMismatch,
    ReadBuffers,
    read_hashed,
)
from engine.lora.peft_format import load_adapter
from engine.model.config import ModelConfig
from tests.adapter_factory import make_peft_adapter

MAX_RANK = 8
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the sha256 computations started (one per hashed read)."""
    calls: list[int] = []

    def counting_sha256() -> object:
        calls.append(1)
        return hashlib.sha256()

    monkeypatch.setattr(hashed_read, "_new_hasher", counting_sha256)
    return calls


def rewrite_with_new_ctime(path: Path, data: bytes) -> None:
    """Write `data` over `path`, late enough that the coarse ctime clock has moved on."""
    before = os.stat(path).st_ctime_ns
    while True:
        time.sleep(0.02)
        path.write_bytes(data)
        if os.stat(path).st_ctime_ns != before:
            return


def test_a_file_is_hashed_once_until_it_changes(tmp_path: Path, hash_calls: list[int]) -> None:
    path = tmp_path / "blob"
    first = os.urandom(3 << 20)
    path.write_bytes(first)
    digests = DigestCache(settle_ns=0)
    read = read_hashed(path, digests)
    assert read.sha256() == hashlib.sha256(first).hexdigest() and read.data == first
    assert len(hash_calls) == 1 and len(digests) == 1
    again = read_hashed(path, digests)
    assert again.sha256() == hashlib.sha256(first).hexdigest() and again.data == first
    assert len(hash_calls) == 1  # remembered, not hashed

    second = os.urandom(len(first))  # same size, other bytes
    rewrite_with_new_ctime(path, second)
    changed = read_hashed(path, digests)
    assert changed.sha256() == hashlib.sha256(second).hexdigest() and changed.data == second
    assert len(hash_calls) == 2
    read_hashed(path, digests).sha256()
    assert len(hash_calls) == 2 and len(digests) == 2

    read_hashed(path, None).sha256()  # no cache: always hashed
    assert len(hash_calls) == 3


def test_a_file_changed_within_the_settle_time_is_not_remembered(
    tmp_path: Path, hash_calls: list[int]
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 1000)
    digests = DigestCache()  # 1 s: a write in the same clock tick could go unseen
    read_hashed(path, digests).sha256()
    read_hashed(path, digests).sha256()
    assert len(hash_calls) == 2 and len(digests) == 0


def test_a_hit_whose_file_changes_while_read_hashes_the_bytes_read(
    tmp_path: Path, hash_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"y" * 1000)
    digests = DigestCache(settle_ns=0)
    read_hashed(path, digests).sha256()
    real_identity = hashed_read._identity
    seen: list[int] = []

    def identity_changing_after_open(stat: os.stat_result) -> tuple[int, int, int, int, int]:
        seen.append(1)
        identity = real_identity(stat)
        return identity if len(seen) % 2 else (*identity[:4], identity[4] + 1)

    monkeypatch.setattr(hashed_read, "_identity", identity_changing_after_open)
    read = read_hashed(path, digests)
    assert read.sha256() == hashlib.sha256(b"y" * 1000).hexdigest()
    assert len(hash_calls) == 2 and len(digests) == 1  # hashed, and not remembered


def test_digest_cache_is_a_bounded_lru() -> None:
    digests = DigestCache(max_entries=2, settle_ns=0)
    now = time.time_ns()
    for i in range(3):
        digests.put((0, i, 1, 0, 0), f"d{i}", now)
        digests.get((0, 0, 1, 0, 0))  # keep the first one recent
    assert len(digests) == 2
    assert digests.get((0, 0, 1, 0, 0)) == "d0" and digests.get((0, 2, 1, 0, 0)) == "d2"
    assert digests.get((0, 1, 1, 0, 0)) is None


def test_read_buffers_are_reused_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    buffers = ReadBuffers(max_spare_bytes=2 << 20)
    first = read_hashed(path, None, buffers)
    buffer = first.data
    first.release()
    assert first.data == b"" and buffers.spare_bytes == len(data)
    second = read_hashed(path, None, buffers)
    assert second.data is buffer and second.data == data
    assert second.sha256() == hashlib.sha256(data).hexdigest()
    second.release()
    buffers.give(bytearray(1 << 20))
    buffers.give(bytearray(1 << 20))  # over the bound: the oldest goes
    assert buffers.spare_bytes == 2 << 20
    assert read_hashed(path, None, buffers).data is not buffer


@pytest.fixture
def folder(base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh PEFT adapter; the process's digest cache trusts files at once."""
    monkeypatch.setattr(VERIFIED_DIGESTS, "settle_ns", 0)
    VERIFIED_DIGESTS.clear()
    return make_peft_adapter(
        base_dir, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=0
    )


def test_a_reloaded_adapter_is_not_hashed_again_and_a_rewritten_one_is_checked(
    folder: Path, model_config: ModelConfig, tmp_path: Path, hash_calls: list[int]
) -> None:
    twin = tmp_path / "twin"  # the same files registered under another id
    shutil.copytree(folder, twin, copy_function=os.link)  # (linking stamps a new ctime)
    first = load_adapter(folder, model_config, MAX_RANK)
    reloads = [
        load_adapter(f, model_config, MAX_RANK, expected_sha256=first.sha256)
        for f in (folder, twin)
    ]
    assert len(hash_calls) == 1
    for weights in reloads:
        assert weights.sha256 == first.sha256
        for group, (a, b) in weights.groups.items():
            assert torch.equal(a, first.groups[group][0]) and torch.equal(b, first.groups[group][1])

    path = folder / WEIGHTS
    original = path.read_bytes()
    edited = original[:-4] + struct.pack("<f", 0.125)  # the last weight, a float32
    assert edited != original
    rewrite_with_new_ctime(path, edited)
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(folder, model_config, MAX_RANK, expected_sha256=first.sha256)
    assert caught.value.reason == "sha256_mismatch" and first.sha256 in str(caught.value)
    assert len(hash_calls) == 2
    assert load_adapter(folder, model_config, MAX_RANK).sha256 == hashlib.sha256(edited).hexdigest()


def test_a_registered_chunked_digest_is_checked_instead_of_the_plain_hash(
    tmp_path: Path, hash_calls: list[int]
) -> None:
    path = tmp_path / "blob"
    data = os.urandom((20 << 20) + 12345)  # two full 8 MiB chunks and a short one
    path.write_bytes(data)
    sha256, chunked = hashlib.sha256(data).hexdigest(), chunked_sha256(data)
    digests = DigestCache(settle_ns=0)
    read = read_hashed(path, digests, registered=(sha256.upper(), chunked.upper()))
    assert read.sha256() == sha256 and read.data == data
    assert not hash_calls  # no pass of the whole file
    assert read_hashed(path, digests).sha256() == sha256  # remembered as checked
    assert not hash_calls


def test_a_file_changed_since_registration_fails_the_chunked_check(
    tmp_path: Path, hash_calls: list[int]
) -> None:
    path = tmp_path / "blob"
    data = bytearray(os.urandom(9 << 20))
    registered = (hashlib.sha256(data).hexdigest(), chunked_sha256(data))
    data[-1] ^= 1  # one bit, in the last chunk
    path.write_bytes(data)
    digests = DigestCache(settle_ns=0)
    with pytest.raises(DigestMismatch) as caught:
        read_hashed(path, digests, registered=registered).sha256()
    assert caught.value.actual == chunked_sha256(data)
    assert len(digests) == 0  # a failed check is not remembered
    assert read_hashed(path, digests).sha256() == hashlib.sha256(data).hexdigest()


def test_an_adapter_loads_against_its_registered_chunked_digest_and_a_changed_one_is_refused(
    folder: Path, model_config: ModelConfig, hash_calls: list[int]
) -> None:
    original = (folder / WEIGHTS).read_bytes()
    sha256, chunked = hashlib.sha256(original).hexdigest(), chunked_sha256(original)
    weights = load_adapter(
        folder, model_config, MAX_RANK, expected_sha256=sha256, expected_chunked_sha256=chunked
    )
    assert weights.sha256 == sha256 and not hash_calls

    edited = original[:-4] + struct.pack("<f", 0.125)  # the last weight, a float32
    rewrite_with_new_ctime(folder / WEIGHTS, edited)
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(
            folder, model_config, MAX_RANK, expected_sha256=sha256, expected_chunked_sha256=chunked
        )
    message = str(caught.value)
    assert caught.value.reason == "sha256_mismatch"
    assert chunked_sha256(edited) in message and chunked in message
    assert "register the new file as a new version" in message


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES, 2 * CHUNK_BYTES + 7])
def test_the_registration_digests_follow_their_definitions(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, size, CHUNK_BYTES)]
    by_definition = hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks))
    assert file_digests(path) == (hashlib.sha256(data).hexdigest(), by_definition.hexdigest())
    assert chunked_sha256(data) == by_definition.hexdigest()
