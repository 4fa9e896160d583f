"""`eval`: held-out loss, style and probes of a run against its base, and the report."""
