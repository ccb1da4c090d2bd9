"""A client that opens many streams at once with a key the engine has not verified yet is
served: the concurrent presentations share one scrypt run, so neither the bounded pool
nor the per-key failure window (a run in progress counts against it) refuses them.
Found by the mini soak: 16 first streams of one key got UNAVAILABLE/RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio

from engine.server.auth import ApiKeyTable
from loraplex.key_guard import GuardLimits, KeyGuard
from loraplex.keys import hash_secret, new_key
from loraplex.v1 import engine_admin_pb2 as admin_pb


def test_concurrent_first_uses_of_one_key_share_one_scrypt_run() -> None:
    limits = GuardLimits(workers=1, max_queued=1, failures_per_key=2)
    table = ApiKeyTable(guard=KeyGuard(limits))
    key_id, secret, key = new_key()
    table.sync([admin_pb.ApiKeyEntry(key_id=key_id, secret_hash=hash_secret(secret),
                                     tenant="acme")], 1)  # fmt: skip

    async def at_once() -> list[str | BaseException]:
        calls = [table.authenticate_async(f"Bearer {key}", "ipv4:10.0.0.9:1") for _ in range(24)]
        return await asyncio.gather(*calls, return_exceptions=True)

    assert asyncio.run(at_once()) == ["acme"] * 24
    assert table.guard.num_verifications == 1
