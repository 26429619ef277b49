"""`convert-cache`: copy a feature cache into the other backend (Zarr v3 <-> WebDataset), shard by
shard, losslessly: every shard's rows are checked against the source's done-marker checksum before
and after writing (the checksum is computed from decoded rows, so it is the same in both backends).
Resumable like extract: shards already done in the target are skipped."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from storage.cache_folder import CacheError, shard_checksum
from storage.caches import BACKENDS, backend_class, find_cache, folder_name, new_cache
from storage.run import Run


def run_convert_cache(run_dir: Path, to: str, feature_id: str | None = None, out: Path | None = None) -> dict:
    """Convert the run's cache (of the other backend) to backend `to`; return a summary."""
    backend_class(to, "--to")
    run = Run(run_dir)
    source = find_cache(run.cache_root, feature_id, backend=next(b for b in BACKENDS if b != to))
    config = source.config()
    target = new_cache(out or run.cache_root / folder_name(config.feature_id, to), to)
    target.open_or_create(replace(config, backend=to, format=target.format_version),
                          vocabulary=run.vocabulary)
    converted, skipped = 0, 0
    for s in sorted(source.done_shards()):
        if target.done_path(s).exists():
            skipped += 1
            continue
        marker = source.done_marker(s)
        start, end = marker.rows
        dnf, label, keys = source.read_rows(start, end)
        if shard_checksum(dnf, label, keys) != marker.checksum:
            raise CacheError(f"{source.root}: shard {s:05d} does not match its checksum; run "
                             f"`verify --run {run.root}` and redo it before converting")
        split, src = source.shard_metadata(start, end)
        index = target.write_shard(start, dnf, label, split, src, keys)
        again = target.read_rows(start, end)
        if shard_checksum(*again) != marker.checksum:
            raise CacheError(f"{target.root}: shard {s:05d} reads back differently from what was written")
        target.mark_done(replace(marker, index=index))
        converted += 1
    return {"source": str(source.root), "target": str(target.root), "backend": to,
            "shards_converted": converted, "shards_already_there": skipped,
            "shards_pending_in_source": config.manifest.num_shards - len(source.done_shards()),
            "size_mib": round(target.size_bytes() / 2**20, 2)}
