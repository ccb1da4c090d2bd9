"""API key format, the scrypt hash, the engine's key table and the control plane's
remembered verdicts (no database)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc
import pytest

from control_plane.services.key_verdicts import KeyVerdicts
from engine.server.auth import ApiKeyTable, AuthError
from loraplex.keys import (
    KeyFormatError,
    format_key,
    hash_secret,
    new_key,
    parse_key,
    verify_secret,
)

FAST = {"n": 2**10, "r": 8, "p": 1}  # cheap scrypt cost for tests of the table's logic


@dataclass(frozen=True)
class Entry:
    key_id: str
    secret_hash: str
    tenant: str


def make(tenant: str) -> tuple[str, Entry]:
    key_id, secret, full = new_key()
    return full, Entry(key_id, hash_secret(secret, **FAST), tenant)


def test_key_round_trip() -> None:
    key_id, secret, full = new_key()
    assert full == format_key(key_id, secret) == f"lpx_{key_id}_{secret}"
    parsed = parse_key(full)
    assert (parsed.key_id, parsed.secret) == (key_id, secret)
    for bad in ("", "lpx_", "lpx_abc", "sk_abc_def", "lpx__secret"):
        with pytest.raises(KeyFormatError):
            parse_key(bad)


def test_hash_format_and_verify() -> None:
    encoded = hash_secret("s3cret")
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(bytes.fromhex(salt)) == 16 and len(bytes.fromhex(digest)) == 32
    assert verify_secret("s3cret", encoded)
    assert not verify_secret("s3cret!", encoded)
    assert hash_secret("s3cret") != encoded  # salted
    for malformed in ("", "scrypt$1$2", "bcrypt$1$2$3$aa$bb", "scrypt$x$8$1$aa$bb"):
        assert not verify_secret("s3cret", malformed)


def test_table_not_enforcing_until_first_sync() -> None:
    table = ApiKeyTable()
    assert not table.enforcing and table.authenticate(None) is None
    full, entry = make("acme")
    assert table.sync([entry], 5) == 5
    assert table.enforcing and table.authenticate(f"Bearer {full}") == "acme"


def test_enforcing_table_refuses_everything_before_a_sync() -> None:
    table = ApiKeyTable(enforcing=True)
    full, _ = make("acme")
    with pytest.raises(AuthError) as exc:
        table.authenticate(f"Bearer {full}")
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Basic abc", "malformed"),
        ("Bearer ", "malformed"),
        ("Bearer not-a-key", "malformed"),
        ("Bearer lpx_unknown_secret", "not accepted"),
    ],
)
def test_refusals_are_unauthenticated(header: str | None, words: str) -> None:
    table = ApiKeyTable()
    table.sync([make("acme")[1]], 1)
    with pytest.raises(AuthError) as exc:
        table.authenticate(header)
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert words in exc.value.message


def test_wrong_secret_for_known_key_id_is_refused() -> None:
    table = ApiKeyTable()
    full, entry = make("acme")
    table.sync([entry], 1)
    forged = full[:-4] + ("0000" if not full.endswith("0000") else "1111")
    with pytest.raises(AuthError):
        table.authenticate(f"Bearer {forged}")
    with pytest.raises(AuthError):  # the cached negative verdict answers the same
        table.authenticate(f"Bearer {forged}")


def test_sync_ignores_older_generations_and_revocation_applies() -> None:
    table = ApiKeyTable()
    full_a, a = make("acme")
    full_b, b = make("globex")
    table.sync([a, b], 3)
    assert table.authenticate(f"bearer {full_a}") == "acme"
    assert table.sync([a], 2) == 3  # older: ignored, b still accepted
    assert table.authenticate(f"Bearer {full_b}") == "globex"
    assert table.sync([a], 3) == 3  # same generation: ignored too
    assert table.sync([a], 4) == 4  # b revoked
    with pytest.raises(AuthError):
        table.authenticate(f"Bearer {full_b}")
    assert table.authenticate(f"Bearer {full_a}") == "acme"  # cached verdict survives


def test_cached_verdict_is_dropped_when_the_entry_changes() -> None:
    table = ApiKeyTable()
    full, entry = make("acme")
    table.sync([entry], 1)
    assert table.authenticate(f"Bearer {full}") == "acme"
    moved = Entry(entry.key_id, entry.secret_hash, "globex")
    table.sync([moved], 2)
    assert table.authenticate(f"Bearer {full}") == "globex"


def test_usage_is_reported_once() -> None:
    table = ApiKeyTable()
    full, entry = make("acme")
    table.sync([entry], 1)
    table.authenticate(f"Bearer {full}")
    used = table.drain_usage()
    assert list(used) == [entry.key_id]
    assert table.drain_usage() == {}


def test_concurrent_authentication() -> None:
    table = ApiKeyTable()
    keys = [make(f"t{i}") for i in range(4)]
    table.sync([e for _, e in keys], 1)
    errors: list[BaseException] = []

    def worker(full: str, tenant: str) -> None:
        try:
            for _ in range(50):
                assert table.authenticate(f"Bearer {full}") == tenant
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f, e.tenant)) for f, e in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_control_plane_verdicts_answer_only_for_the_same_stored_hash() -> None:
    verdicts = KeyVerdicts(max_entries=2)
    verdicts.put(b"k1", "id1", "hash-a", True)
    assert verdicts.get(b"k1", "id1", "hash-a") is True
    assert verdicts.get(b"k1", "id1", "hash-b") is None  # the key's stored hash changed
    assert verdicts.get(b"k1", "id2", "hash-a") is None
    verdicts.put(b"k2", "id2", "hash-a", False)
    assert verdicts.get(b"k2", "id2", "hash-a") is False
    verdicts.get(b"k1", "id1", "hash-a")  # k1 is now the most recently used
    verdicts.put(b"k3", "id3", "hash-a", True)
    assert len(verdicts) == 2 and verdicts.get(b"k2", "id2", "hash-a") is None
    assert verdicts.get(b"k1", "id1", "hash-a") is True
