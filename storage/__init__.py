"""Everything that touches bytes on disk: run directory, manifest shards, feature caches."""
