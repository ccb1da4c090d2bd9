"""The audit log: who did what, when."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from control_plane.models import AuditEvent

_ACTOR_LEN = AuditEvent.__table__.c.actor.type.length
_SUBJECT_LEN = AuditEvent.__table__.c.subject.type.length


class AuditRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def record(
        self,
        actor: str,
        action: str,
        subject: str,
        now: datetime,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Add one event. `actor` and `subject` are cut to their columns' lengths: they
        quote caller-supplied text (an engine's address), and the event must not fail
        the change it records."""
        self._session.add(
            AuditEvent(
                at=now,
                actor=actor[:_ACTOR_LEN],
                action=action,
                subject=subject[:_SUBJECT_LEN],
                details=details or {},
            )
        )
        self._session.flush()
