"""Repositories: queries and writes on one session. They flush, never commit."""
