"""The LORAPLEX_* environment variables, read here and nowhere else; also
TRITON_CACHE_DIR, which `engine serve` respects.

Each LORAPLEX_* one is the fallback of a flag, read when a command's parser is built (or, for
`--adapter-root`, when its flags are known), so a variable means the same to every
command that takes it. Torch-free: `loraplex --help` stays quick.
"""

from __future__ import annotations

import os
from pathlib import Path


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def admin_token() -> str:
    """The admin token of the control plane and the engines ("" = none set)."""
    return _env("LORAPLEX_ADMIN_TOKEN")


def control_plane(default: str = "") -> str:
    """HOST:PORT of the control plane."""
    return _env("LORAPLEX_CONTROL_PLANE", default)


def database_url() -> str:
    """The control plane's database URL ("" = the embedded SQLite default)."""
    return _env("LORAPLEX_DATABASE_URL")


def api_key() -> str:
    """A tenant's API key, for `generate`."""
    return _env("LORAPLEX_API_KEY")


def cache_dir() -> Path:
    """Where `--model default` is converted to."""
    return Path(_env("LORAPLEX_CACHE_DIR", str(Path.home() / ".cache" / "loraplex" / "models")))


def triton_cache_dir() -> str:
    """Where Triton keeps compiled kernels, when the user says ("" = not set)."""
    return _env("TRITON_CACHE_DIR")


def data_dir() -> Path:
    """Where `loraplex up` keeps its SQLite file, adapters, logs and up.json."""
    return Path(_env("LORAPLEX_DATA_DIR", str(Path.home() / ".local" / "share" / "loraplex")))


def adapter_roots(flags: list[str] | None) -> tuple[Path, ...]:
    """The folders adapters may be read from: the `--adapter-root` flags when any are
    given, else LORAPLEX_ADAPTER_ROOTS (':'-separated). Flags replace the variable's list
    in every process, so a command line says the whole list whatever the environment."""
    chosen = flags or [p for p in _env("LORAPLEX_ADAPTER_ROOTS").split(":") if p]
    return tuple(Path(p).expanduser().resolve() for p in chosen)


def with_admin_token(token: str) -> dict[str, str]:
    """This process's environment with the admin token set: what `loraplex up` gives the
    processes it starts, so they all share one token."""
    return {**os.environ, "LORAPLEX_ADMIN_TOKEN": token}
