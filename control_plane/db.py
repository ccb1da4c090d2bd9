"""Database engines and sessions: Postgres (psycopg 3) in production, SQLite embedded."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

# A database host that vanishes without closing its connections is noticed within
# about idle + interval * count seconds, not the kernel's default two hours.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
               "keepalives_count": 3}  # fmt: skip


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3; other URLs pass unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def make_db_engine(
    url: str,
    *,
    connect_timeout_s: float | None = None,
    statement_timeout_s: float | None = None,
    **kwargs: Any,
) -> Engine:
    """Create an Engine; for SQLite, create the file's folder and enforce foreign keys.

    On Postgres, `connect_timeout_s` bounds each connection attempt and
    `statement_timeout_s` each statement (lock waits included), and TCP keepalives are
    on, so no call can hang on a database that is down or out of reach: it fails (see
    `database_unreachable`) and the caller can answer UNAVAILABLE, retry, or shut down.

    On SQLite every transaction starts with `BEGIN IMMEDIATE`: it takes the database's
    write lock before its first read, so a transaction's reads and writes are atomic
    (SQLite has no row locks; `with_for_update` is a no-op there, and this is what
    serializes, say, two registrations of one tenant).
    """
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    connect_args: dict[str, Any] = dict(_KEEPALIVES)
    if connect_timeout_s is not None:
        connect_args["connect_timeout"] = max(1, math.ceil(connect_timeout_s))  # whole seconds
    if statement_timeout_s is not None:
        # Appended to any `options` the URL already carries (a search_path, say).
        options = str(parsed.query.get("options", ""))
        setting = f"-c statement_timeout={max(1, round(statement_timeout_s * 1000))}"
        connect_args["options"] = f"{options} {setting}".strip()
    # Pre-ping: connections the pool kept across a database restart are replaced, not
    # handed out dead.
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or answer in time (down,
    restarting, a timeout, a full pool), as opposed to a bug or bad data: worth an
    UNAVAILABLE and a retry later."""
    return isinstance(exc, (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError))


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite would otherwise BEGIN only before the first write, leaving a transaction's
    # reads outside it; SQLAlchemy's documented recipe: turn that off and BEGIN ourselves.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")
