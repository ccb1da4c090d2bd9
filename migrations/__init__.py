"""Alembic migrations of the control plane's database (see control_plane.migrate)."""
