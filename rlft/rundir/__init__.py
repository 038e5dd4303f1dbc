"""The run directory: one absolute path, one writer, lineage, gates, follow-up hints, the results table."""
