"""Services: one transaction per call; they return records, never ORM objects."""
