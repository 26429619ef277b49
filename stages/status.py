"""`status`: how far a run is: manifest counts, and per feature cache the shards done, pending
and held by a worker, images cached, rejects, and bytes on disk."""

from __future__ import annotations

from pathlib import Path

from pipeline.queue import ShardQueue
from storage.cache_folder import FeatureCache
from storage.caches import caches_in
from storage.packed_images import pack_path
from storage.run import Run


def cache_status(cache: FeatureCache, num_shards: int) -> dict:
    """One cache's progress: shards done, pending and held by a worker; images; rejects; bytes."""
    done = cache.done_shards()
    queue = ShardQueue(cache.claims_dir, num_shards, lambda s: s in done)
    markers = [cache.done_marker(s) for s in sorted(done)]
    held = {s: queue.holder(s) for s in queue.pending()}
    config = cache.config()
    return {
        "cache": str(cache.root),
        "feature_id": config.feature_id,
        "backend": cache.backend,
        "feature": config.feature.to_json(),
        "model_path": config.model_path,
        "shards_done": len(done),
        "shards_pending": num_shards - len(done),
        "shards_in_progress": {f"{s:05d}": h for s, h in held.items() if h},
        "images_cached": sum(m.cached for m in markers),
        "rejected_at_extract": sum(len(m.rejected) for m in markers),
        "bytes": cache.size_bytes(),
    }


def run_status(run_dir: Path) -> dict:
    """The run's manifest counts and every cache's progress."""
    run = Run(run_dir)
    info = run.info()
    return {
        "run": str(run.root),
        "shards": info.num_shards,
        "images": info.images,
        "files_seen": info.files,
        "rejected_at_shard": info.rejects,
        "duplicates": info.duplicates,
        "packed": sum(pack_path(run.root, i).exists() for i in range(info.num_shards)),
        "caches": [cache_status(c, info.num_shards) for c in caches_in(run.cache_root)],
    }


def format_status(s: dict) -> str:
    """A few readable lines for the terminal."""
    lines = [
        f"run {s['run']}: {s['images']} images in {s['shards']} shards "
        f"({s['files_seen']} files seen, {s['rejected_at_shard']} rejected, "
        f"{s['duplicates']} duplicates{', ' + str(s['packed']) + ' shards packed' if s['packed'] else ''})",
    ]
    if not s["caches"]:
        lines.append("  no feature cache yet: run `dnf-pipeline extract`")
    for c in s["caches"]:
        f = c["feature"]
        lines.append(
            f"  cache {c['feature_id']} ({f.get('kind', 'dnf')}, {c['backend']}, t={f['timestep']}, "
            f"size={f['size']}, "
            f"{f['encoding']}): "
            f"{c['shards_done']}/{s['shards']} shards done, {c['shards_pending']} pending, "
            f"{c['images_cached']} images cached, {c['rejected_at_extract']} rejected at extract, "
            f"{c['bytes'] / 2**20:.1f} MiB")
        for shard, holder in c["shards_in_progress"].items():
            lines.append(f"    shard {shard} in progress by {holder}")
    return "\n".join(lines)
