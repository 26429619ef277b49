"""`show`: the image / DNF pairs of chosen images of a run, as one PNG (the same tiles as the eval
gallery), to see what the detector sees."""

from __future__ import annotations

import os
from pathlib import Path

from stages.domain.gallery import sheet, tile
from stages.domain.sources import ReadContext, RunReader
from storage.cache_folder import NOT_CACHED
from storage.caches import find_cache
from storage.errors import UserError
from storage.run import Run


def run_show(run_dir: Path, wanted: list[str], out: Path, feature_id: str | None = None) -> dict:
    """Tiles for images named by manifest key (or a unique prefix) or by path."""
    run = Run(run_dir)
    cache = find_cache(run.cache_root, feature_id)
    labels, _, _, keys = cache.index_arrays()
    row_of = {str(k): r for r, k in enumerate(keys) if labels[r] != NOT_CACHED}
    entries = run.entries()
    by_path = {os.path.abspath(e.path): e for e in entries}
    chosen = []
    for name in wanted:
        entry = by_path.get(os.path.abspath(name))
        if entry is None:
            matches = [e for e in entries if e.key.startswith(name.lower())] if len(name) >= 6 else []
            if len(matches) != 1:
                raise UserError(f"{name}: {'several images match' if matches else 'no image of the run'} "
                                f"(give a path from the manifest or a key prefix of 6+ hex digits)")
            entry = matches[0]
        if entry.key not in row_of:
            raise UserError(f"{name}: not in the cache {cache.root} (not extracted yet, or rejected "
                            f"at extract)")
        chosen.append(entry)
    reader = cache.row_reader()
    images = RunReader(ReadContext(run.root))  # each through its input source, checked by its key
    tiles = [tile(e, reader[row_of[e.key]], [f"{'fake' if e.label else 'real'} {e.split}", e.source,
                                             Path(e.path).name], images) for e in chosen]
    reader.close()
    images.close()
    sheet(tiles, Path(out))
    return {"out": str(out), "images": len(tiles), "cache": str(cache.root)}
