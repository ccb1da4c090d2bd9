"""Counts of rows by state, for the metrics scrape: one GROUP BY per table, read only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from control_plane.models import AdapterVersion, Engine, Placement, Tenant


@dataclass(frozen=True)
class FleetCounts:
    """How many rows are in each state; a state with no rows is absent."""

    tenants: dict[str, int]
    adapter_versions: dict[str, int]
    engines: dict[str, int]
    placements: dict[tuple[str, str], int]  # (desired, observed) -> count


class StatsRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def fleet_counts(self) -> FleetCounts:
        placements = self._session.execute(
            select(Placement.desired_state, Placement.observed_state, func.count()).group_by(
                Placement.desired_state, Placement.observed_state
            )
        )
        return FleetCounts(
            tenants=self._by(Tenant.state),
            adapter_versions=self._by(AdapterVersion.state),
            engines=self._by(Engine.state),
            placements={(desired, observed): n for desired, observed, n in placements},
        )

    def _by(self, column: InstrumentedAttribute[Any]) -> dict[str, int]:
        rows = self._session.execute(select(column, func.count()).group_by(column))
        return {state: n for state, n in rows}
