"""Bearer credentials (`authorization: Bearer <token>`), read the same way wherever a
server takes them: gRPC call metadata on both servers, the HTTP API's header.

The scheme is matched case-insensitively and blanks around the token are ignored, as
RFC 6750 clients expect. Deciding what a missing or malformed credential means is left
to the caller (an API key, an admin token): each refuses with its own sentence.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable


def metadata_authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `authorization` value of gRPC call metadata; None when there is none."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return value.decode() if isinstance(value, bytes) else value
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an authorization value: None without a value, "" when the token is
    empty or the scheme is not Bearer."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def tokens_match(presented: str | None, expected: str) -> bool:
    """Whether `presented` is the secret `expected`, compared in constant time (how long
    it takes says nothing of where they differ). Never true for an empty one."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())
