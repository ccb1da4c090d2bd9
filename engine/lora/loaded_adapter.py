"""What the engine knows about one loaded adapter: the registry's mutable entry and the
frozen snapshot (`LoadedAdapter`) it hands out, which is what `ListAdapters` reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from engine.formats.adapter_header import AdapterSummary


@dataclass(frozen=True)
class LoadedAdapter:
    """A snapshot of one loaded adapter, as the admin API lists it."""

    adapter_id: str
    tenant: str
    aliases: tuple[str, ...]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    sha256: str
    path: Path  # resolved adapter folder
    loaded_at: datetime  # UTC
    last_used: datetime  # UTC; last acquire, else load time
    requests_in_flight: int
    evicting: bool  # refuses new requests; leaves when requests_in_flight reaches 0
    in_cpu_cache: bool  # weights held in host memory (else re-read from disk on use)


@dataclass
class AdapterEntry:
    """The registry's live bookkeeping for one adapter; only touched under its lock."""

    adapter_id: str
    tenant: str
    aliases: list[str]
    summary: AdapterSummary
    path: Path
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_used: datetime = field(default_factory=lambda: datetime.now(UTC))
    in_flight: int = 0
    evicting: bool = False

    def snapshot(self, in_cpu_cache: bool) -> LoadedAdapter:
        return LoadedAdapter(
            adapter_id=self.adapter_id,
            tenant=self.tenant,
            aliases=tuple(self.aliases),
            rank=self.summary.rank,
            alpha=self.summary.alpha,
            target_modules=self.summary.target_modules,
            size_bytes=self.summary.size_bytes,
            sha256=self.summary.sha256,
            path=self.path,
            loaded_at=self.loaded_at,
            last_used=self.last_used,
            requests_in_flight=self.in_flight,
            evicting=self.evicting,
            in_cpu_cache=in_cpu_cache,
        )
