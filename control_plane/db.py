"""Database engines and sessions: Postgres (psycopg 3) in production, SQLite embedded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3; other URLs pass unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def make_db_engine(url: str, **kwargs: Any) -> Engine:
    """Create an Engine; for SQLite, create the file's folder and enforce foreign keys.

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
    return create_engine(url, pool_pre_ping=True, **kwargs)


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
