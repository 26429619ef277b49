"""Limits on untrusted image files (`--max-pixels`, `--max-bytes`), shared by shard and extract;
kept in a module of its own so that `shard`'s worker processes need not import torch."""

DEFAULT_MAX_PIXELS = 8192 * 8192  # decompression-bomb limit, checked from the header
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
