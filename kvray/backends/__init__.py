"""Index backends that keep their state outside the process (Redis)."""
