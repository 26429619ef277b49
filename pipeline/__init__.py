"""How stages run: configuration, the shard work queue, progress, device choice."""

__version__ = "0.1.0"
