"""The control plane's configuration, built once in main() from flags and environment."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from control_plane.reconciler.config import ReconcilerConfig


@dataclass(frozen=True)
class ControlPlaneConfig:
    database_url: str
    admin_token: str
    adapter_roots: tuple[Path, ...] = ()
    host: str = "0.0.0.0"
    port: int = 50050  # 0 = any free port (tests)
    metrics_port: int = 0  # Prometheus /metrics over HTTP on `host`; 0 = off
    metrics_cache_s: float = 5.0  # fleet gauges re-read from the database at most this often
    default_max_adapters: int = 100
    default_max_lora_rank: int = 64
    # Run `upgrade head` at start (the embedded SQLite default); otherwise a database
    # behind the migrations is refused with a message saying to run migrate.
    auto_migrate: bool = False
    reconciler: ReconcilerConfig = field(default_factory=ReconcilerConfig)
    # Bounds on every database call (Postgres), so a database that is down or out of
    # reach fails RPCs with UNAVAILABLE instead of hanging them, passes or shutdown.
    db_connect_timeout_s: float = 5.0
    db_statement_timeout_s: float = 30.0
    # After SIGTERM: health NOT_SERVING, new calls UNAVAILABLE, and calls in flight get
    # this long to finish before the server stops.
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.admin_token:
            raise ValueError(
                "an admin token is required: pass --admin-token or set LORAPLEX_ADMIN_TOKEN"
            )
        if not self.database_url:
            raise ValueError("a database URL is required (--database-url)")
        for name in ("db_connect_timeout_s", "db_statement_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(
                f"the shutdown grace must be 0 or more seconds, not {self.shutdown_grace_s}"
            )
