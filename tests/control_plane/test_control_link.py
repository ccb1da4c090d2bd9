"""The engine's control link against a real control plane: join, heartbeat, rejoin."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy import text

from engine.server.auth import ApiKeyTable
from engine.server.control_link import ControlLinkConfig, run_control_link
from loraplex.v1 import control_plane_pb2 as pb
from loraplex.v1 import engine_admin_pb2 as admin_pb
from tests.control_plane.cp_harness import ADMIN_TOKEN, BackgroundLoop, running_control_plane
from tests.control_plane.test_reconciler import cp_config, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_link_waits_for_the_control_plane_then_heartbeats_and_rejoins(
    clean_db: str, adapter_root: Path, sessions
) -> None:  # noqa: ANN001
    port = free_port()
    info = admin_pb.EngineInfo(boot_id="boot-1", model_fingerprint="f", max_loras=2)
    keys = ApiKeyTable()
    link = ControlLinkConfig(
        control_plane=f"127.0.0.1:{port}",
        advertise="127.0.0.1:7999",
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
            assert (engine.address, engine.max_loras) == ("127.0.0.1:7999", 2)
            info.max_loras = 3  # heartbeats carry fresh facts
            wait_for(lambda: engines()[0].max_loras == 3, 5, "a heartbeat")

            admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
            key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant="acme"))
            # The reconciler cannot reach 127.0.0.1:7999; sync the engine's table by hand.
            generation, table = cp.running.services.tenants.key_table()
            keys.sync(
                [admin_pb.ApiKeyEntry(key_id=k, secret_hash=h, tenant=t) for k, h, t in table],
                generation,
            )
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
