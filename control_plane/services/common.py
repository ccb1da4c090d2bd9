"""What every service shares: the session factory, the clock, the change hook."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from control_plane.errors import invalid

# Tenant and adapter names appear inside engine ids ("tenant/name@3"): no '/' or '@'.
TENANT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
BASE_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
# Counts land in Integer columns: int4 on Postgres, so larger values cannot be stored.
INT32_MAX = 2**31 - 1


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


def check_base_model_name(name: str) -> None:
    if not BASE_MODEL_NAME.match(name):
        raise invalid(
            f"base model name {name!r} is invalid: use 1-128 letters, digits, '.', '-', '_' "
            "or ':', starting with a letter or digit"
        )


def check_count(field: str, value: int, maximum: int = INT32_MAX) -> None:
    """INVALID_ARGUMENT unless 0 <= value <= maximum (the proto's uint32 allows more)."""
    if not 0 <= value <= maximum:
        raise invalid(f"{field} is {value}; it must be between 0 and {maximum}")


def check_text(field: str, value: str, column: InstrumentedAttribute[str]) -> None:
    """INVALID_ARGUMENT unless `value` fits `column` (String(n)) and holds no NUL byte."""
    limit = getattr(column.type, "length", None)
    if limit is not None and len(value) > limit:
        raise invalid(f"{field} is {len(value)} characters long; at most {limit} are allowed")
    if "\x00" in value:
        raise invalid(f"{field} contains a NUL byte; send printable text")
