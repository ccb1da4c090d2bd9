"""The reconciler's apply step against real engines' EngineAdmin servers (in-process).

Engines run the real serving stack on the tiny model, registered through their own
control link; the control plane runs on real Postgres with a short reconcile interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from control_plane.config import ControlPlaneConfig
from control_plane.models import Engine, Placement
from control_plane.reconciler.config import ReconcilerConfig
from engine.config import EngineConfig
from engine.server.auth import AuthError
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import engine_admin_pb2 as admin_pb
from tests.control_plane.cp_harness import ADMIN_TOKEN, ControlPlaneHandle, running_control_plane
from tests.engine_server import RunningEngine, running_engine

T = TypeVar("T")
BASE = "tiny"


def wait_for(check: Callable[[], T], timeout: float = 10, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def cp_config(url: str, adapter_root: Path, **reconciler: Any) -> ControlPlaneConfig:
    settings = {
        "interval_s": 0.3,
        "heartbeat_timeout_s": 3.0,
        "retry_base_s": 0.1,
        "retry_cap_s": 1.0,
        **reconciler,
    }
    return ControlPlaneConfig(
        database_url=url,
        admin_token=ADMIN_TOKEN,
        adapter_roots=(adapter_root,),
        host="127.0.0.1",
        port=0,
        default_max_lora_rank=16,
        reconciler=ReconcilerConfig(**settings),
    )


def engine_config(
    base_dir: Path, adapter_root: Path, cp: ControlPlaneHandle, **overrides: Any
) -> EngineConfig:
    values: dict[str, Any] = dict(
        model_path=base_dir,
        port=0,
        kv_cache_tokens=512,
        block_size=16,
        max_loras=4,
        max_lora_rank=16,
        admin_token=ADMIN_TOKEN,
        adapter_roots=(adapter_root,),
        control_plane=cp.address,
    )
    values.update(overrides)
    return EngineConfig(**values)


def held(engine: RunningEngine) -> dict[str, tuple[str, ...]]:
    reply = engine.admin.ListAdapters(
        admin_pb.ListAdaptersRequest(), metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),)
    )
    return {a.adapter_id: tuple(a.aliases) for a in reply.adapters if not a.evicting}


@pytest.fixture
def cp(clean_db: str, adapter_root: Path) -> Iterator[ControlPlaneHandle]:
    with running_control_plane(cp_config(clean_db, adapter_root)) as handle:
        admin = handle.client()
        admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
        admin.CreateTenant(pb.CreateTenantRequest(name="globex"))
        yield handle


def registered(cp: ControlPlaneHandle, base_dir: Path) -> None:
    cp.client().RegisterBaseModel(pb.RegisterBaseModelRequest(name=BASE, path=str(base_dir)))


def register(cp: ControlPlaneHandle, name: str, folder: Path, **kw: Any) -> pb.AdapterVersion:
    return cp.client().RegisterAdapter(
        pb.RegisterAdapterRequest(tenant="acme", name=name, uri=str(folder), base_model=BASE, **kw)
    )


def test_versions_follow_registration_and_retirement(
    cp: ControlPlaneHandle,
    base_dir: Path,
    adapter_root: Path,
    good_adapter: Path,
    other_adapter: Path,
) -> None:
    registered(cp, base_dir)
    with running_engine(engine_config(base_dir, adapter_root, cp)) as engine:
        wait_for(
            lambda: cp.client().ListEngines(pb.ListEnginesRequest()).engines,
            10,
            "the engine to register",
        )
        register(cp, "a", good_adapter)
        wait_for(lambda: held(engine) == {"acme/a@1": ("acme/a",)}, 10, "v1 loaded")
        v1_loaded_at = engine.parts.adapters.get("acme/a@1").loaded_at
        register(cp, "a", other_adapter)  # v2 takes the alias, v1 stays by id
        wait_for(
            lambda: held(engine) == {"acme/a@1": (), "acme/a@2": ("acme/a",)},
            10,
            "the alias to move to v2",
        )
        # The alias moved without evicting v1: it kept serving by id throughout.
        assert engine.parts.adapters.get("acme/a@1").loaded_at == v1_loaded_at
        resolved = cp.client().ResolveAdapter(pb.ResolveAdapterRequest(adapter="acme/a"))
        assert resolved.version == 2 and list(resolved.endpoints) == [f"127.0.0.1:{engine.port}"]
        cp.client().RetireAdapter(pb.RetireAdapterRequest(tenant="acme", name="a", version=2))
        wait_for(
            lambda: held(engine) == {"acme/a@1": ("acme/a",)},
            10,
            "v2 evicted and the alias back on v1",
        )
        cp.client().RetireAdapter(pb.RetireAdapterRequest(tenant="acme", name="a"))
        wait_for(lambda: held(engine) == {}, 10, "everything evicted")


def test_keys_reach_engines_and_revocation_within_seconds(
    cp: ControlPlaneHandle,
    base_dir: Path,
    adapter_root: Path,
) -> None:
    admin = cp.client()
    with running_engine(engine_config(base_dir, adapter_root, cp)) as engine:
        keys = engine.parts.keys
        key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
        other = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="globex"))

        def accepted(api_key: str) -> str | None:
            try:
                return keys.authenticate(f"Bearer {api_key}")
            except AuthError:
                return None

        assert wait_for(lambda: accepted(key.api_key), 5, "the key on the engine") == "acme"
        assert accepted(other.api_key) == "globex"
        start = time.monotonic()
        admin.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.key_id))
        wait_for(lambda: accepted(key.api_key) is None, 5, "revocation on the engine")
        admin.DisableTenant(pb.DisableTenantRequest(name="globex"))
        wait_for(lambda: accepted(other.api_key) is None, 5, "tenant disabling on the engine")
        assert time.monotonic() - start < 5


def test_a_version_no_engine_can_load_is_marked_failed(
    cp: ControlPlaneHandle,
    base_dir: Path,
    adapter_root: Path,
    good_adapter: Path,
    other_adapter: Path,
) -> None:
    registered(cp, base_dir)
    # The engine's slots hold rank 4 at most; the second version has rank 8.
    with running_engine(engine_config(base_dir, adapter_root, cp, max_lora_rank=4)) as engine:
        register(cp, "a", good_adapter)
        wait_for(lambda: "acme/a@1" in held(engine), 10, "v1 loaded")
        register(cp, "a", other_adapter)

        def failed() -> pb.AdapterVersion | None:
            adapter = cp.client().GetAdapter(pb.GetAdapterRequest(tenant="acme", name="a"))
            return next(
                (
                    v
                    for v in adapter.versions
                    if v.version == 2 and v.state == pb.ADAPTER_STATE_FAILED
                ),
                None,
            )

        version = wait_for(failed, 15, "v2 marked failed")
        assert "rank" in version.failure_reason
        wait_for(lambda: held(engine) == {"acme/a@1": ("acme/a",)}, 10, "alias back on v1")
        adapter = cp.client().GetAdapter(pb.GetAdapterRequest(tenant="acme", name="a"))
        assert adapter.current_version == 1


def test_a_silent_engine_loses_its_replicas(
    cp: ControlPlaneHandle,
    base_dir: Path,
    adapter_root: Path,
    good_adapter: Path,
    other_adapter: Path,
) -> None:
    registered(cp, base_dir)
    with ExitStack() as first_stack, ExitStack() as second_stack:
        stacks = [first_stack, second_stack]
        engines = []
        for stack in stacks:
            engines.append(
                stack.enter_context(running_engine(engine_config(base_dir, adapter_root, cp)))
            )
            count = len(engines)
            wait_for(
                lambda count=count: (
                    len(cp.client().ListEngines(pb.ListEnginesRequest()).engines) == count
                )
            )
        register(cp, "everywhere", good_adapter)
        register(cp, "once", other_adapter, replicas=1)
        wait_for(
            lambda: all("acme/everywhere@1" in held(e) for e in engines),
            10,
            "the adapter on both engines",
        )
        wait_for(
            lambda: sum("acme/once@1" in held(e) for e in engines) == 1, 10, "one replica of 'once'"
        )
        holder = 0 if "acme/once@1" in held(engines[0]) else 1
        spare = engines[1 - holder]
        stacks[holder].close()  # the engine holding the single replica goes silent
        wait_for(lambda: "acme/once@1" in held(spare), 15, "the replica to move")
        engines = cp.client().ListEngines(pb.ListEnginesRequest()).engines
        assert sorted(e.state for e in engines) == [pb.ENGINE_STATE_LIVE, pb.ENGINE_STATE_STALE]


def test_a_restarted_engine_gets_its_adapters_back_and_a_clean_slate(
    cp: ControlPlaneHandle,
    base_dir: Path,
    adapter_root: Path,
    good_adapter: Path,
    other_adapter: Path,
    sessions: sessionmaker[Session],
) -> None:
    registered(cp, base_dir)

    def refused_for_good(address: str) -> bool:
        query = (
            select(Placement.id)
            .join(Engine)
            .where(Engine.address == address, Placement.permanent_failure.is_(True))
        )
        with sessions() as session:
            return session.scalars(query).first() is not None

    with running_engine(engine_config(base_dir, adapter_root, cp)) as spare:
        # A's slots take rank 4 at most: it refuses the rank-8 adapter for good.
        with running_engine(engine_config(base_dir, adapter_root, cp, max_lora_rank=4)) as a:
            address = f"127.0.0.1:{a.port}"
            wait_for(lambda: len(cp.client().ListEngines(pb.ListEnginesRequest()).engines) == 2)
            register(cp, "small", good_adapter)
            register(cp, "big", other_adapter)
            wait_for(lambda: set(held(spare)) == {"acme/small@1", "acme/big@1"}, 10, "spare")
            wait_for(lambda: "acme/small@1" in held(a), 10, "small on A")
            wait_for(lambda: refused_for_good(address), 10, "A to refuse big for good")
        # A restarts at the same address (a new boot id), now with room for rank 8: what
        # the old process refused is asked again, and what it held comes back.
        config = engine_config(base_dir, adapter_root, cp, port=int(address.split(":")[1]))
        with running_engine(config) as again:
            wait_for(
                lambda: set(held(again)) == {"acme/small@1", "acme/big@1"},
                10,
                "both adapters on the restarted engine",
            )
            assert not refused_for_good(address)


def test_concurrent_registration_creates_one_version(
    cp: ControlPlaneHandle,
    base_dir: Path,
    good_adapter: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    registered(cp, base_dir)
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda _: register(cp, "same", good_adapter).version, range(4)))
    assert versions == [1, 1, 1, 1]


def test_engine_admin_refuses_calls_without_the_admin_token(
    cp: ControlPlaneHandle,
    base_dir: Path,
    adapter_root: Path,
) -> None:
    with running_engine(engine_config(base_dir, adapter_root, cp)) as engine:
        with pytest.raises(grpc.RpcError) as exc:
            engine.admin.ListAdapters(admin_pb.ListAdaptersRequest())
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
