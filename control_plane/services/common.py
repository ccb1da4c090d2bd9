"""What every service shares: the session factory, the clock, the change hook."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from control_plane.errors import invalid

# Tenant and adapter names appear inside engine ids ("tenant/name@3"): no '/' or '@'.
TENANT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
BASE_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ServiceContext:
    """`on_change` runs after a commit that changes what engines should hold or accept."""

    sessions: sessionmaker[Session]
    clock: Callable[[], datetime] = utcnow
    on_change: Callable[[], None] = field(default=lambda: None)


def check_tenant_name(name: str) -> None:
    if not TENANT_NAME.match(name):
        raise invalid(
            f"tenant name {name!r} is invalid: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter"
        )


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME.match(name):
        raise invalid(
            f"adapter name {name!r} is invalid: use 1-128 letters, digits, '.', '-' or '_', "
            "starting with a letter or digit"
        )
