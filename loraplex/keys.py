"""API key format and the slow hash of its secret, shared by the control plane and engines.

A key reads `lpx_<key_id>_<secret>`: `key_id` is a public prefix (stored in clear, shown
in listings), `secret` is stored only as an scrypt hash
`scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>`, so a database dump does not leak usable keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_PREFIX = "lpx"
KEY_ID_HEX_CHARS = 12
SECRET_HEX_CHARS = 40
# scrypt cost: ~16 MiB and tens of milliseconds per verification; engines verify a key
# once and cache the verdict, so this cost is paid once per key per engine.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_MAXMEM = 64 * 1024 * 1024


class KeyFormatError(ValueError):
    """The presented string is not a loraplex API key."""


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    secret: str


def new_key() -> tuple[str, str, str]:
    """Return `(key_id, secret, full key)` for a fresh random key."""
    key_id = secrets.token_hex(KEY_ID_HEX_CHARS // 2)
    secret = secrets.token_hex(SECRET_HEX_CHARS // 2)
    return key_id, secret, format_key(key_id, secret)


def format_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}_{key_id}_{secret}"


def parse_key(key: str) -> ParsedKey:
    """Split `lpx_<key_id>_<secret>`; raise KeyFormatError saying what is wrong."""
    parts = key.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        raise KeyFormatError("an API key reads 'lpx_<key id>_<secret>'")
    return ParsedKey(key_id=parts[1], secret=parts[2])


def hash_secret(
    secret: str,
    *,
    n: int = SCRYPT_N,
    r: int = SCRYPT_R,
    p: int = SCRYPT_P,
    salt: bytes | None = None,
) -> str:
    """Slow salted hash of `secret` as `scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>`."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, dklen=_HASH_BYTES, maxmem=_MAXMEM
    )
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def verify_secret(secret: str, encoded: str) -> bool:
    """True when `secret` hashes to `encoded`; False for a wrong secret or a malformed hash."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, expected = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
        digest = hashlib.scrypt(
            secret.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=_MAXMEM
        )
    except (ValueError, OverflowError):
        return False
    return hmac.compare_digest(digest, expected)


# Admin tokens guard every admin RPC of the control plane and engines; `loraplex up`
# makes one of 32 URL-safe characters (192 bits). The servers refuse shorter ones.
MIN_ADMIN_TOKEN_CHARS = 32


def check_admin_token(token: str) -> None:
    """Raise ValueError, saying how to make a good one, for a set token shorter than
    MIN_ADMIN_TOKEN_CHARS ("" = none set: whether that is allowed is the caller's call)."""
    if token and len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ValueError(
            f"the admin token is {len(token)} characters long; use at least "
            f"{MIN_ADMIN_TOKEN_CHARS} random ones, e.g. "
            "LORAPLEX_ADMIN_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
