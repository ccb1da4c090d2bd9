"""A private Postgres cluster that a test may stop, kill and restart at will.

The shared server on 127.0.0.1:5432 serves every other test, so fault tests never
touch it: `PrivatePostgres` runs `initdb` in a temporary folder and `pg_ctl` on a free
loopback port. Postgres refuses to run as root, so under root the server binaries run
as the `postgres` user (`runuser`), which then owns the folder.

Use the `private_postgres` fixture (import it into a test module), or the class
directly: `url` is a SQLAlchemy URL of a migrated database `loraplex`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from control_plane import migrate
from tests.ports import free_port

DATABASE = "loraplex"


def _bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parent)
    return found[-1].parent if found else None


class PrivatePostgres:
    """One throwaway cluster; `start`, `stop` and `restart` are synchronous."""

    def __init__(self, bin_dir: Path) -> None:
        self._bin = bin_dir
        self._as_root = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.port = free_port()
        if self._as_root:
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")  # fmt: skip

    @property
    def server_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.server_url}/{DATABASE}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends every connection and stops; `immediate` is a crash (no
        checkpoint: the next start recovers)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self) -> str:
        """Create and migrate the database `loraplex`; its URL."""
        with psycopg.connect(f"{self.server_url}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        migrate.upgrade(self.url)
        return self.url

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self._bin / program), *args]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise subprocess.CalledProcessError(
                result.returncode, command, result.stdout, f"{result.stderr}\n{log}"
            )


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started private cluster with a migrated database `loraplex` (`.url`)."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("no Postgres server binaries under /usr/lib/postgresql")
    cluster = PrivatePostgres(bin_dir)
    try:
        cluster.start()
        cluster.create_database()
        yield cluster
    finally:
        cluster.destroy()
