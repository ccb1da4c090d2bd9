"""A free TCP port on loopback, for servers a test starts as separate processes."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (another process could still take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
