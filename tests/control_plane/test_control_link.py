"""The engine's control link against a real control plane: join, heartbeat, rejoin."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
from sqlalchemy import text

from engine.server.auth import ApiKeyTable
from engine.server.control_link import ControlLinkConfig, run_control_link
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import engine_admin_pb2_grpc as admin_pb_grpc
from tests.control_plane.cp_harness import ADMIN_TOKEN, BackgroundLoop, running_control_plane
from tests.control_plane.test_reconciler import cp_config, wait_for
from tests.ports import free_port


class KeysOnlyEngineAdmin(admin_pb_grpc.EngineAdminServicer):
    """The parts of an engine's EngineAdmin the reconciler calls when nothing is placed."""

    def __init__(self, keys: ApiKeyTable) -> None:
        self._keys = keys

    def SyncApiKeys(self, request, context):  # noqa: ANN001, ANN201, N802
        return admin_pb.SyncApiKeysResponse(
            generation=self._keys.sync(request.keys, request.generation)
        )

    def ListAdapters(self, request, context):  # noqa: ANN001, ANN201, N802
        return admin_pb.ListAdaptersResponse()


def test_link_waits_for_the_control_plane_then_heartbeats_and_rejoins(
    clean_db: str, adapter_root: Path, sessions
) -> None:  # noqa: ANN001
    port = free_port()
    info = admin_pb.EngineInfo(boot_id="boot-1", model_fingerprint="f", max_loras=2)
    keys = ApiKeyTable()
    engine_admin = grpc.server(ThreadPoolExecutor(2))
    admin_pb_grpc.add_EngineAdminServicer_to_server(KeysOnlyEngineAdmin(keys), engine_admin)
    engine_port = engine_admin.add_insecure_port("127.0.0.1:0")
    engine_admin.start()
    advertise = f"127.0.0.1:{engine_port}"
    link = ControlLinkConfig(
        control_plane=f"127.0.0.1:{port}",
        advertise=advertise,
        admin_token=ADMIN_TOKEN,
        heartbeat_interval_s=0.2,
        retry_initial_s=0.1,
        retry_max_s=0.3,
    )
    background = BackgroundLoop()
    task = asyncio.run_coroutine_threadsafe(
        run_control_link(link, lambda: info, keys), background.loop
    )
    try:
        time.sleep(0.5)  # the link is retrying against nothing
        assert not task.done()
        config = replace(cp_config(clean_db, adapter_root), port=port)
        with running_control_plane(config) as cp:
            admin = cp.client()

            def engines() -> list[pb.Engine]:
                return list(admin.ListEngines(pb.ListEnginesRequest()).engines)

            [engine] = wait_for(engines, 10, "the engine to register")
            assert (engine.address, engine.max_loras) == (advertise, 2)
            info.max_loras = 3  # heartbeats carry fresh facts
            wait_for(lambda: engines()[0].max_loras == 3, 5, "a heartbeat")

            admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
            key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
            # The reconciler pushes the key table to the advertised EngineAdmin.
            wait_for(lambda: len(keys) == 1, 10, "the key table to reach the engine")
            assert keys.authenticate(f"Bearer {key.api_key}") == "acme"
            wait_for(
                lambda: admin.ListApiKeys(pb.ListApiKeysRequest()).keys[0].HasField("last_used_at"),
                5,
                "key usage reported by a heartbeat",
            )

            with sessions.begin() as session:  # the control plane forgets the engine
                session.execute(text("DELETE FROM engines"))
            wait_for(lambda: len(engines()) == 1, 5, "the engine to register again")
            info.boot_id = "boot-2"  # a restart under the same address
            wait_for(lambda: engines()[0].boot_id == "boot-2", 5, "re-registration on restart")
    finally:
        task.cancel()
        background.run(asyncio.sleep(0.2))  # let the cancellation finish on its loop
        background.close()
        engine_admin.stop(0)


class ForgetOnFirstUsage(ApiKeyTable):
    """Deletes the engine's row as key usage is first drained: the heartbeat that would
    report it is answered NOT_FOUND, and the link registers again."""

    def __init__(self, forget: Callable[[], None]) -> None:
        super().__init__()
        self._forget = forget
        self.forgot = False

    def drain_usage(self) -> dict[str, float]:
        used = super().drain_usage()
        if used and not self.forgot:
            self._forget()
            self.forgot = True
        return used


def test_key_usage_is_reported_after_registering_again(
    clean_db: str, adapter_root: Path, sessions
) -> None:  # noqa: ANN001
    def forget() -> None:
        with sessions.begin() as session:
            session.execute(text("DELETE FROM engines"))

    keys = ForgetOnFirstUsage(forget)
    engine_admin = grpc.server(ThreadPoolExecutor(2))
    admin_pb_grpc.add_EngineAdminServicer_to_server(KeysOnlyEngineAdmin(keys), engine_admin)
    engine_port = engine_admin.add_insecure_port("127.0.0.1:0")
    engine_admin.start()
    info = admin_pb.EngineInfo(boot_id="boot-1", model_fingerprint="f")
    background = BackgroundLoop()
    task = None
    try:
        with running_control_plane(cp_config(clean_db, adapter_root)) as cp:
            admin = cp.client()
            admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
            key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
            link = ControlLinkConfig(
                control_plane=cp.address,
                advertise=f"127.0.0.1:{engine_port}",
                admin_token=ADMIN_TOKEN,
                heartbeat_interval_s=0.1,
                retry_initial_s=0.1,
                retry_max_s=0.3,
            )
            task = asyncio.run_coroutine_threadsafe(
                run_control_link(link, lambda: info, keys), background.loop
            )
            wait_for(lambda: len(keys) == 1, 10, "the key table to reach the engine")
            assert keys.authenticate(f"Bearer {key.api_key}") == "acme"
            wait_for(lambda: keys.forgot, 5, "the heartbeat carrying the usage")
            wait_for(
                lambda: admin.ListApiKeys(pb.ListApiKeysRequest()).keys[0].HasField("last_used_at"),
                3,
                "the usage reported after registering again",
            )
    finally:
        if task is not None:
            task.cancel()
        background.run(asyncio.sleep(0.2))
        background.close()
        engine_admin.stop(0)
