"""The control plane: the Postgres registry of tenants, adapter versions and engines."""
