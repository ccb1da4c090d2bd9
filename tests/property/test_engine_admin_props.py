"""Random requests to every EngineAdmin RPC on a real engine: hostile adapter folders
and paths, any ids, tenants and aliases, key tables of any size and generation, any
credentials. Each call gets an answer or a clean refusal (never INTERNAL/UNKNOWN, never
a hang); afterwards the engine is put back as the control plane would put it and still
serves both tenants."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex.keys import hash_secret, parse_key
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import engine_admin_pb2_grpc, inference_pb2
from tests.engine_server import collect
from tests.property.checks import call_cleanly, check_refusal, eventually, property_settings
from tests.property.conftest import (
    ADAPTER_NAMES,
    ADAPTERS,
    ADMIN,
    ServedEngine,
    assert_still_serving,
    good_request,
)
from tests.property.strategies import ascii_metadata, lists, name_like, text, uint64

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
HAS_CONFIG_PIN = "config_sha256" in admin_pb.LoadAdapterRequest.DESCRIPTOR.fields_by_name


def _edit_config(folder: Path, **changes: Any) -> None:
    raw = json.loads((folder / CONFIG).read_text())
    raw.update(changes)
    (folder / CONFIG).write_text(json.dumps(raw))  # NaN and Infinity as Python writes them


def _hostile_folders(root: Path, good: Path) -> list[Path]:
    """Adapter folders under the root that the engine must refuse, each for its own
    reason: FIFOs, links out of the root and to devices, a header claiming 2^60 bytes,
    a catastrophic regex, non-finite or absurd numbers, invalid JSON."""
    made: list[Path] = []

    def copy(name: str) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        made.append(folder)
        return folder

    fifo = copy("fifo")
    for name in (CONFIG, WEIGHTS):
        (fifo / name).unlink()
        os.mkfifo(fifo / name)
    links = copy("links")
    (links / CONFIG).unlink()
    (links / CONFIG).symlink_to("/etc/hostname")
    (links / WEIGHTS).unlink()
    (links / WEIGHTS).symlink_to("/dev/zero")
    header = copy("huge_header")
    (header / WEIGHTS).write_bytes(struct.pack("<Q", 2**60) + b"{}")
    _edit_config(copy("regex"), target_modules="(a+)+$")
    _edit_config(copy("alpha_nan"), lora_alpha=float("nan"))
    _edit_config(copy("alpha_huge"), lora_alpha=1e30)
    _edit_config(copy("rank_inf"), r=float("inf"))
    (copy("bad_json") / CONFIG).write_text("{not json")
    (root / "not_a_folder").write_text("x")
    made.append(root / "not_a_folder")
    return made


@pytest.fixture(scope="module")
def folders(served: ServedEngine) -> list[str]:
    """Paths LoadAdapter is tried with: good, hostile, outside the root, system ones."""
    hostile = _hostile_folders(served.adapter_root, served.adapter_folder)
    return [
        str(served.adapter_folder),
        *map(str, hostile),
        str(served.adapter_root),
        str(served.adapter_root / "missing"),
        str(served.adapter_root / ".." / "elsewhere"),
        "/", "/etc", "/proc/self", "/proc/self/fd/0", "/dev/zero", "/dev", "/sys",
        "relative/path", "\x00", f"{served.adapter_folder}\x00x",
    ]  # fmt: skip


def _restore(served: ServedEngine) -> None:
    """What a reconciler would do: evict everything, then load what should be there
    (the examples may have put other content under the fixture's ids and aliases)."""
    admin = served.running.admin
    for adapter in admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=ADMIN).adapters:
        admin.EvictAdapter(
            admin_pb.EvictAdapterRequest(adapter_id=adapter.adapter_id), metadata=ADMIN
        )
    assert eventually(
        lambda: not admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=ADMIN).adapters
    )
    for adapter_id, (tenant, aliases) in ADAPTERS.items():
        if adapter_id != "acme-old":
            admin.LoadAdapter(
                admin_pb.LoadAdapterRequest(
                    adapter_id=adapter_id,
                    path=str(served.adapter_folder),
                    tenant=tenant,
                    aliases=aliases,
                ),
                metadata=ADMIN,
            )


def _aliases() -> st.SearchStrategy[list[str]]:
    distinct = st.integers(100, 3_000).map(lambda n: [f"alias-{i}" for i in range(n)])
    return st.one_of(lists(name_like(*ADAPTER_NAMES), "x", max_huge=100_000), distinct)


LOAD_FIELDS = ("adapter_id", "path", "sha256", "config_sha256", "tenant", "aliases")


def test_random_loads_and_evictions_get_a_clean_answer(
    served: ServedEngine, folders: list[str]
) -> None:
    sha = hashlib.sha256((served.adapter_folder / WEIGHTS).read_bytes()).hexdigest()
    config_sha = hashlib.sha256((served.adapter_folder / CONFIG).read_bytes()).hexdigest()
    digests = st.one_of(st.sampled_from(("", sha, config_sha, "0" * 64, "Z" * 64)), text())
    ids = name_like(*ADAPTERS, "fresh-1", "fresh-2")
    # field -> (a value the engine must take, any value at all)
    values = {
        "adapter_id": (st.sampled_from((*ADAPTERS, "fresh-1", "fresh-2")), ids),
        "path": (st.just(str(served.adapter_folder)), st.one_of(st.sampled_from(folders), text())),
        "sha256": (st.sampled_from(("", sha)), digests),
        "config_sha256": (st.sampled_from(("", config_sha)), digests),
        "tenant": (st.sampled_from(("acme", "globex", "")), name_like("acme", "globex", "")),
        "aliases": (st.lists(st.from_regex(r"\A[a-z]{1,8}/[a-z]{1,8}\Z"), max_size=3), _aliases()),
    }
    admin = served.running.admin

    @property_settings(max_examples=60)
    @given(data=st.data(), evict=st.one_of(st.none(), ids))
    def examples(data: st.DataObject, evict: str | None) -> None:
        # A few (often no) fields spoiled, so that loads succeed as often as they fail.
        spoiled = data.draw(st.sets(st.sampled_from(LOAD_FIELDS), max_size=3))
        drawn = {f: data.draw(values[f][f in spoiled]) for f in LOAD_FIELDS}
        if not HAS_CONFIG_PIN:
            del drawn["config_sha256"]
        request = admin_pb.LoadAdapterRequest(**drawn)
        loaded = call_cleanly(admin.LoadAdapter, request, "LoadAdapter", metadata=ADMIN)
        if loaded is not None:  # what was loaded is what was asked for
            assert loaded.adapter.adapter_id == request.adapter_id
            assert loaded.adapter.tenant == request.tenant
            assert set(loaded.adapter.aliases) <= set(request.aliases)
        if evict is not None:
            call_cleanly(
                admin.EvictAdapter,
                admin_pb.EvictAdapterRequest(adapter_id=evict),
                "EvictAdapter",
                metadata=ADMIN,
            )

    examples()
    root = served.adapter_root.resolve()
    listed = admin.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=ADMIN, timeout=30)
    assert all(Path(a.path).is_relative_to(root) for a in listed.adapters)  # the sandbox held
    _restore(served)
    assert_still_serving(served)


def test_random_key_tables_get_a_clean_answer(served: ServedEngine) -> None:
    """Tables of any size, any entries and any generation are taken or ignored, never
    failed; the tenants' keys are in every table, so they must keep working."""
    good = []
    for tenant, key in served.keys.items():
        parsed = parse_key(key)
        good.append(
            admin_pb.ApiKeyEntry(
                key_id=parsed.key_id, secret_hash=hash_secret(parsed.secret), tenant=tenant
            )
        )
    entry = st.builds(admin_pb.ApiKeyEntry, key_id=text(), secret_hash=text(), tenant=text())
    filler = admin_pb.ApiKeyEntry(key_id="filler", secret_hash="x", tenant="t")

    @property_settings(max_examples=30)
    @given(entries=lists(entry, filler, max_huge=50_000), generation=uint64())
    def examples(entries: list[admin_pb.ApiKeyEntry], generation: int) -> None:
        request = admin_pb.SyncApiKeysRequest(keys=[*entries, *good], generation=generation)
        answer = call_cleanly(
            served.running.admin.SyncApiKeys, request, "SyncApiKeys", metadata=ADMIN
        )
        assert answer is not None, "a well-formed key table was refused"
        assert answer.generation >= max(generation, 1)

    examples()
    assert_still_serving(served)


@pytest.mark.parametrize(
    "rpc", ["LoadAdapter", "EvictAdapter", "ListAdapters", "GetEngineInfo", "SyncApiKeys"]
)
def test_random_admin_credentials_are_refused(served: ServedEngine, rpc: str) -> None:
    """Every EngineAdmin RPC needs the admin token: anything else is UNAUTHENTICATED or
    PERMISSION_DENIED, and changes nothing."""
    stub = engine_admin_pb2_grpc.EngineAdminStub(served.running.channel)
    request = {
        "LoadAdapter": admin_pb.LoadAdapterRequest(
            adapter_id="intruder", path=str(served.adapter_folder)
        ),
        "EvictAdapter": admin_pb.EvictAdapterRequest(adapter_id="acme-a"),
        "ListAdapters": admin_pb.ListAdaptersRequest(),
        "GetEngineInfo": admin_pb.GetEngineInfoRequest(),
        "SyncApiKeys": admin_pb.SyncApiKeysRequest(generation=2**64 - 1),
    }[rpc]

    @property_settings(max_examples=12)
    @given(authorization=ascii_metadata())
    def examples(authorization: str) -> None:
        metadata = (("authorization", authorization),) if authorization else ()
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, rpc)(request, metadata=metadata, timeout=30)
        assert check_refusal(caught.value, rpc) in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        )

    examples()
    assert_still_serving(served)  # acme-a was not evicted, no table replaced the keys


def test_every_hostile_folder_is_refused_cleanly(served: ServedEngine, folders: list[str]) -> None:
    """Each hostile folder and path once, whatever the random draws above picked: a
    clean refusal within the deadline (a FIFO used to block a load forever). The one
    with alpha 1e30 is finite: refused if its scaled weights overflow the serving dtype,
    else it serves its own tenant garbage, greedy or sampled, but ends cleanly and
    disturbs nobody else."""
    admin = served.running.admin
    for index, path in enumerate(folders[1:]):  # all but the good folder
        request = admin_pb.LoadAdapterRequest(adapter_id=f"hostile-{index}", path=path)
        if path.endswith("alpha_huge"):
            request.tenant = "acme"
            if call_cleanly(admin.LoadAdapter, request, path, metadata=ADMIN) is None:
                continue  # refused: its scaled weights overflow the serving dtype
            for temperature in (0.0, 1.0):
                garbage = good_request(request.adapter_id)
                garbage.sampling.temperature = temperature
                result = collect(
                    served.running.inference.Generate(
                        garbage, metadata=served.tenant("acme"), timeout=30
                    )
                )
                assert result.finish_reason == inference_pb2.FINISH_REASON_LENGTH
            continue
        with pytest.raises(grpc.RpcError) as caught:
            answer = admin.LoadAdapter(request, metadata=ADMIN, timeout=10)
            pytest.fail(f"{path} loaded: {answer}")
        check_refusal(caught.value, f"LoadAdapter({path!r})")
    assert_still_serving(served)
