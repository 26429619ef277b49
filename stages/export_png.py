"""`export-png`: write a reference-encoded cache as the reference code's PNG folder tree (same
relative paths under `--out`, suffix `.png`), so the reference's own train / eval code can read it."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from storage.cache_folder import CacheError
from storage.caches import find_cache
from storage.feature_dataset import cache_index
from storage.run import Run


def relative_name(path: str, roots: list[str]) -> Path:
    """The image's path below its input root (prefixed with the root's name when there are several)."""
    for root in roots:
        root = os.path.normpath(root)
        if os.path.normpath(path).startswith(root + os.sep):
            rel = Path(os.path.relpath(path, root))
            return Path(Path(root).name) / rel if len(roots) > 1 else rel
    return Path(Path(path).name)


def run_export_png(run_dir: Path, out: Path, feature_id: str | None = None) -> dict:
    """Write every cached DNF of a reference-encoded cache as a PNG, in the input folders' tree."""
    run = Run(run_dir)
    info = run.info()
    cache = find_cache(run.cache_root, feature_id)
    config = cache.config()
    if config.feature.encoding != "reference":
        raise CacheError(f"{cache.root} holds raw float16 features, which have no PNG form; "
                         f"extract with --encoding reference to export")
    paths = {e.key: e.path for e in run.entries()}
    roots = list(info.roots)
    rows = []
    for split in sorted({e.split for e in run.entries()}):
        index = cache_index(cache, split)
        rows += [(int(row), key, relative_name(paths[key], roots)) for row, key in zip(index.rows, index.keys,
                                                                                      strict=True)]
    targets = png_names([rel for _, _, rel in rows])
    dnf = cache.row_reader()
    for (row, _, _), target in zip(rows, targets, strict=True):
        target = Path(out) / target
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(dnf[row].transpose(1, 2, 0))).save(target)
    renamed = sum(t != rel.with_suffix(".png") for t, (_, _, rel) in zip(targets, rows, strict=True))
    return {"out": str(out), "images": len(rows), "renamed": renamed, "feature_id": config.feature_id}


def png_names(relatives: list[Path]) -> list[Path]:
    """Each image's PNG path: its relative path with the suffix `.png`; images that would share one
    (`x.jpg` and `x.png` in one folder) keep their suffix in the name instead (`x.jpg.png`), so no
    DNF overwrites another."""
    plain = [rel.with_suffix(".png") for rel in relatives]
    count = Counter(plain)
    names = [p if count[p] == 1 else rel.with_name(rel.name + ".png") for p, rel in zip(plain, relatives,
                                                                                       strict=True)]
    clash = next((n for n, c in Counter(names).items() if c > 1), None)
    if clash is not None:  # an input already named like another one's suffixed name
        raise CacheError(f"export-png: two images would be written to {clash} even with their suffixes "
                         f"kept; export their input folders into separate --out folders")
    return names
