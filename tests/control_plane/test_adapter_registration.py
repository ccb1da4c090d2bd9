"""RegisterAdapter's edge cases: symlinked files, out-of-range and malformed input,
what identical content means, and the sentences of its refusals. A real server on
real Postgres."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest

from loraplex.v1 import control_plane_pb2 as pb
from tests.control_plane.cp_harness import Client
from tests.control_plane.rpc_helpers import BASE, code_of, register, sha256


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_files_linked_outside_the_roots_are_refused(
    with_base: Client, adapter_root: Path, good_adapter: Path, tmp_path: Path, name: str
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(good_adapter, outside)
    evil = adapter_root / f"evil-{tmp_path.name}"
    shutil.copytree(good_adapter, evil)
    (evil / name).unlink()
    os.symlink(outside / name, evil / name)
    request = pb.RegisterAdapterRequest(tenant="acme", name="evil", uri=str(evil), base_model=BASE)
    code, details = code_of(with_base.RegisterAdapter, request)
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert name in details and "outside the adapter roots" in details
    # A link that stays inside the roots is fine.
    (evil / name).unlink()
    os.symlink(good_adapter / name, evil / name)
    assert with_base.RegisterAdapter(request).version == 1


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("replicas", 3_000_000_000, ("replicas", "2147483647")),
        ("uri", "/tmp/a\x00b", ("not a usable path",)),
        ("uri", "file:///tmp/a%00b", ("not a usable path",)),
        ("sha256", "abc", ("64 hex digits",)),
        ("sha256", "g" * 64, ("64 hex digits",)),
        ("base_model", "a\x00b", ("base model name",)),
    ],
)
def test_malformed_input_is_invalid_argument(
    with_base: Client, good_adapter: Path, field: str, value: object, words: tuple[str, ...]
) -> None:
    request = pb.RegisterAdapterRequest(
        tenant="acme", name="a", uri=str(good_adapter), base_model=BASE
    )
    setattr(request, field, value)
    code, details = code_of(with_base.RegisterAdapter, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    for word in words:
        assert word in details, details


def test_wrong_checksum_says_which_differs(with_base: Client, good_adapter: Path) -> None:
    code, details = code_of(
        with_base.RegisterAdapter,
        pb.RegisterAdapterRequest(
            tenant="acme", name="a", uri=str(good_adapter), base_model=BASE, sha256="0" * 64
        ),
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert f"has sha256 {sha256(good_adapter)}, not the given {'0' * 64}" in details
    assert "changed since it was registered" not in details
    upper = register(with_base, "a", good_adapter, sha256=sha256(good_adapter).upper())
    assert upper.sha256 == sha256(good_adapter)


def test_file_uri_with_one_slash_is_absolute(with_base: Client, good_adapter: Path) -> None:
    version = with_base.RegisterAdapter(
        pb.RegisterAdapterRequest(
            tenant="acme", name="a", uri=f"file:{good_adapter}", base_model=BASE
        )
    )
    assert (version.version, version.uri) == (1, f"file:{good_adapter}")


def test_old_content_again_is_a_new_current_version(
    with_base: Client, good_adapter: Path, other_adapter: Path
) -> None:
    admin = with_base
    assert register(admin, "a", good_adapter).version == 1
    assert register(admin, "a", other_adapter).version == 2
    rollback = register(admin, "a", good_adapter)  # v1's content: a rollback
    assert (rollback.version, rollback.current, rollback.sha256) == (3, True, sha256(good_adapter))
    again = register(admin, "a", good_adapter)  # the current content: idempotent
    assert (again.version, again.current) == (3, True)
    adapter = admin.GetAdapter(pb.GetAdapterRequest(tenant="acme", name="a"))
    assert adapter.current_version == 3
    assert admin.ResolveAdapter(pb.ResolveAdapterRequest(adapter="acme/a")).version == 3


def test_replicas_cannot_change_for_the_current_content(
    with_base: Client, good_adapter: Path, other_adapter: Path
) -> None:
    admin = with_base
    register(admin, "a", good_adapter, replicas=1)
    code, details = code_of(
        admin.RegisterAdapter,
        pb.RegisterAdapterRequest(
            tenant="acme", name="a", uri=str(good_adapter), base_model=BASE, replicas=2
        ),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "replicas cannot change for existing content" in details
    assert register(admin, "a", good_adapter, replicas=1).version == 1
    # New content may carry its own replicas.
    assert register(admin, "a", other_adapter, replicas=2).replicas == 2


def test_quota_says_how_to_free_a_place_and_retiring_does(
    admin: Client, base_dir: Path, good_adapter: Path, other_adapter: Path
) -> None:
    admin.CreateTenant(pb.CreateTenantRequest(name="acme", max_adapters=1))
    admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=BASE, path=str(base_dir)))
    register(admin, "one", good_adapter)
    request = pb.RegisterAdapterRequest(
        tenant="acme", name="two", uri=str(other_adapter), base_model=BASE
    )
    code, details = code_of(admin.RegisterAdapter, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "RetireAdapter" in details and "max_adapters" in details
    assert "raise the tenant's quota" not in details
    admin.RetireAdapter(pb.RetireAdapterRequest(tenant="acme", name="one"))
    assert admin.RegisterAdapter(request).version == 1
    # "one" holds no active version now; bringing it back needs a place again.
    code, _ = code_of(
        admin.RegisterAdapter,
        pb.RegisterAdapterRequest(
            tenant="acme", name="one", uri=str(good_adapter), base_model=BASE
        ),
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_unsafe_regex_in_the_config_is_invalid_argument(
    with_base: Client, adapter_root: Path, good_adapter: Path, tmp_path: Path
) -> None:
    """adapter_config.json is untrusted: a pattern that needs backtracking is refused with
    a sentence (it used to answer INTERNAL), and the server keeps registering others."""
    import json

    hostile = adapter_root / f"hostile-{tmp_path.name}"
    shutil.copytree(good_adapter, hostile)
    config = json.loads((hostile / "adapter_config.json").read_text())
    config["target_modules"] = r"(\w+)\1_proj"
    (hostile / "adapter_config.json").write_text(json.dumps(config))
    request = pb.RegisterAdapterRequest(
        tenant="acme", name="hostile", uri=str(hostile), base_model=BASE
    )
    code, details = code_of(with_base.RegisterAdapter, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "target_modules" in details and "list the module names instead" in details
    assert register(with_base, "fine", good_adapter).version == 1


def test_numbers_beyond_the_columns_are_invalid_argument_not_internal(
    with_base: Client, good_adapter: Path
) -> None:
    """Versions past 32 bits, engine ids past 64, page tokens with non-ASCII digits: each
    is INVALID_ARGUMENT with a sentence (they reached SQL and answered INTERNAL)."""
    from loraplex.v1 import engine_admin_pb2 as admin_pb

    register(with_base, "a", good_adapter)
    calls = [
        (with_base.ResolveAdapter, pb.ResolveAdapterRequest(adapter="acme/a@999999999999"),
         "999999999999"),
        (with_base.ResolveAdapter, pb.ResolveAdapterRequest(adapter="acme/a@\u0661"),
         "expected 'tenant/name"),
        (with_base.RetireAdapter,
         pb.RetireAdapterRequest(tenant="acme", name="a", version=3_000_000_000), "version"),
        (with_base.ListAdapters,
         pb.ListTenantAdaptersRequest(tenant="acme", page_token="a\u0661\u0662"), "page_token"),
        (with_base.ListAdapters,
         pb.ListTenantAdaptersRequest(tenant="acme", page_token="a" + "9" * 30), "page_token"),
        (with_base.Heartbeat,
         pb.HeartbeatRequest(engine_id=2**63 + 5, boot_id="b",
                             info=admin_pb.EngineInfo(boot_id="b", model_fingerprint="f")),
         "engine_id"),
    ]  # fmt: skip
    for call, request, words in calls:
        code, details = code_of(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (request, details)
        assert words in details, details
    assert with_base.ResolveAdapter(pb.ResolveAdapterRequest(adapter="acme/a@1")).adapter_id
