"""`verify`: re-read every done shard of a run's caches and check it against its done marker
(checksum, rows, count) and the manifest (keys, labels). Reports each bad shard with a hint."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage.cache_folder import NOT_CACHED, FeatureCache, shard_checksum
from storage.caches import caches_in, find_cache
from storage.run import Run


def verify_shard(run: Run, cache: FeatureCache, shard_id: int, shard_size: int) -> str | None:
    """None when the shard is intact, else what is wrong with it."""
    marker = cache.done_marker(shard_id)
    entries = run.shard_entries(shard_id)
    start, end = shard_id * shard_size, shard_id * shard_size + len(entries)
    if list(marker.rows) != [start, end] or marker.count != len(entries):
        return f"done marker says rows {list(marker.rows)}, the manifest shard has rows [{start}, {end}]"
    shard_file = cache.shard_file(shard_id)
    if not shard_file.exists() and marker.cached:  # (a shard of rejected rows only has no data file)
        return f"marked done but its data is missing ({shard_file})"
    try:
        dnf, label, keys = cache.read_rows(start, end)
    except Exception as e:  # corrupt compressed chunks or shard index
        return f"data unreadable ({type(e).__name__}: {e})"
    if keys != [e.key for e in entries]:
        return "keys differ from the manifest"
    rejected = marker.rejected_keys
    expected = np.array([NOT_CACHED if e.key in rejected else e.label for e in entries], dtype=np.int8)
    if not np.array_equal(label, expected):
        return "labels differ from the manifest"
    if shard_checksum(dnf, label, keys) != marker.checksum:
        return "data differs from the checksum in its done marker (changed or corrupted bytes)"
    return None


def redo_hint(run: Run, cache: FeatureCache, shard_id: int) -> str:
    """The extract command that recomputes one shard of this cache."""
    config = cache.config()
    f = config.feature
    kind = f" --feature {f.kind} --ddim-steps {f.ddim_steps}" if f.kind != "dnf" else ""
    return (f"dnf-pipeline extract --run {run.root} --model {config.model_path or 'MODEL'} "
            f"--size {f.size} --timestep {f.timestep} --encoding {f.encoding}{kind} --redo {shard_id}")


def verify_cache(run: Run, cache: FeatureCache) -> dict:
    """Every done shard of one cache checked; a problem and a hint per bad shard."""
    info = run.info()
    problems = []
    manifest = cache.config().manifest
    if manifest.fingerprint != run.manifest_fingerprint(min(manifest.num_shards, info.num_shards)):
        problems.append({"shard": None, "problem": "the manifest changed after this cache was made",
                         "hint": "re-shard into a new run"})
    done = sorted(cache.done_shards())
    for s in done:
        if s >= info.num_shards:
            problems.append({"shard": s, "problem": "done marker for a shard the manifest lacks",
                             "hint": f"delete {cache.done_path(s)}"})
            continue
        problem = verify_shard(run, cache, s, info.shard_size)
        if problem:
            problems.append({"shard": s, "problem": problem, "hint": redo_hint(run, cache, s)})
    return {"cache": str(cache.root), "shards_checked": len(done),
            "shards_pending": info.num_shards - len(done), "problems": problems}


def run_verify(run_dir: Path, feature_id: str | None = None) -> dict:
    """Verify the run's caches (or the one with this feature id)."""
    run = Run(run_dir)
    caches = [find_cache(run.cache_root, feature_id)] if feature_id else caches_in(run.cache_root)
    reports = [verify_cache(run, c) for c in caches]
    return {"run": str(run.root), "caches": reports,
            "ok": all(not r["problems"] for r in reports)}
