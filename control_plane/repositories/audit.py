"""The audit log: who did what, when."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from control_plane.models import AuditEvent


class AuditRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def record(
        self, actor: str, action: str, subject: str, now: datetime,
        details: dict[str, Any] | None = None,
    ) -> None:
        self._session.add(
            AuditEvent(at=now, actor=actor, action=action, subject=subject, details=details or {})
        )
        self._session.flush()

    def recent(self, limit: int = 100) -> list[AuditEvent]:
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        return list(self._session.scalars(query))
