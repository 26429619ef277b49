"""What every feature cache folder has, whatever its backend (DESIGN.md sec. 4): `config.json`,
`done/NNNNN.json` markers written last and atomically with a backend-independent checksum, claim
files beside the folder; and finding the caches of a run.

Backends: `storage.zarr_cache.ZarrCache` (Zarr v3, the default) and `storage.wds_cache.WdsCache`
(WebDataset tar shards). Rows of manifest shard i are [i * shard_size, i * shard_size + len(shard));
a row whose image failed to decode at extract time has label -1 and is listed in its done marker.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.config import describe_differences
from storage.atomic import read_json, write_json_atomic

NOT_CACHED = -1  # label of a row whose image was rejected at extract time
BACKENDS = ("zarr", "webdataset")


class CacheError(RuntimeError):
    """A cache that cannot be used as asked; the message names the folder and what differs."""


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the duration of the block (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shard_checksum(dnf: np.ndarray, label: np.ndarray, keys: list[str]) -> str:
    """sha256 of a shard's decoded data: independent of the backend and its compression."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(dnf).tobytes())
    h.update(np.ascontiguousarray(label, dtype=np.int8).tobytes())
    h.update("\n".join(keys).encode())
    return "sha256:" + h.hexdigest()


class FeatureCache:
    """A cache folder: config, done markers, claims; the backend subclass stores the rows."""

    backend = ""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def claims_dir(self) -> Path:
        """Runtime claim files live beside the cache, so the cache folder holds only its data."""
        return self.root.parent / f"{self.root.name}.claims"

    @property
    def done_dir(self) -> Path:
        return self.root / "done"

    def done_path(self, shard_id: int) -> Path:
        return self.done_dir / f"{shard_id:05d}.json"

    def exists(self) -> bool:
        return self.config_path.exists()

    def config(self) -> dict:
        if not self.exists():
            raise CacheError(f"{self.root}: no feature cache here (config.json missing); run `extract`")
        return read_json(self.config_path)

    def open_or_create(self, config: dict, num_rows: int, shard_size: int, size: int, dtype: str,
                       channels: int = 3) -> None:
        """Create the cache for `config`, or check that the existing one was made with the same.

        `config["about"]` is informational (paths, versions) and never compared.
        """
        with file_lock(self.root.parent / f"{self.root.name}.lock"):
            if self.exists():
                old = self.config()
                diff = describe_differences(
                    {k: v for k, v in old.items() if k != "about"},
                    {k: v for k, v in config.items() if k != "about"})
                if diff:
                    raise CacheError(
                        f"{self.root} was made with another config; refusing to mix features.\n  "
                        + "\n  ".join(diff)
                        + "\nUse the settings it was made with, or another cache folder.")
                return
            self.root.mkdir(parents=True, exist_ok=True)
            self._create(config, num_rows, shard_size, size, dtype, channels)
            write_json_atomic(self.config_path, config)  # last: marks the cache as created

    def _create(self, config: dict, num_rows: int, shard_size: int, size: int, dtype: str,
                channels: int) -> None:
        raise NotImplementedError

    def done_marker(self, shard_id: int) -> dict | None:
        """The shard's done marker, or None while it is not done."""
        path = self.done_path(shard_id)
        return read_json(path) if path.exists() else None

    def index_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """label, split, source, key of every row; label -1 for rows without features, including
        every row of a shard not marked done."""
        raise NotImplementedError

    def done_shards(self) -> set[int]:
        """Ids of the shards with a done marker."""
        if not self.done_dir.exists():
            return set()
        return {int(p.stem) for p in self.done_dir.glob("*.json") if p.stem.isdigit()}

    def mark_done(self, shard_id: int, marker: dict) -> None:
        """Written last, atomically: from now on the shard counts as complete."""
        write_json_atomic(self.done_path(shard_id), marker)

    def size_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total


def load_cache(root: Path | str) -> FeatureCache:
    """The cache folder at `root` as its backend's class (from its config.json)."""
    from storage.wds_cache import WdsCache
    from storage.zarr_cache import ZarrCache

    root = Path(root)
    backend = read_json(root / "config.json").get("backend", "zarr") if (root / "config.json").exists() \
        else "zarr"
    return WdsCache(root) if backend == "webdataset" else ZarrCache(root)


def folder_name(feature_id: str, backend: str) -> str:
    """A cache's folder under RUN/cache/: the feature id, with `-wds` for WebDataset caches."""
    return feature_id if backend == "zarr" else f"{feature_id}-wds"


def new_cache(root: Path | str, backend: str) -> FeatureCache:
    """An (empty) cache folder object of the given backend."""
    from storage.wds_cache import WdsCache
    from storage.zarr_cache import ZarrCache

    if backend not in BACKENDS:
        raise CacheError(f"--backend {backend}: one of {', '.join(BACKENDS)}")
    return WdsCache(root) if backend == "webdataset" else ZarrCache(root)


def caches_in(cache_root: Path) -> list[FeatureCache]:
    """Every feature cache folder under a run's `cache/`, by folder name."""
    if not cache_root.exists():
        return []
    return [load_cache(p) for p in sorted(cache_root.iterdir()) if (p / "config.json").exists()]


def perturbed_siblings(cache_root: Path, feature: dict, backend: str | None = None) -> list[FeatureCache]:
    """Caches of the same features as `feature` computed on perturbed images, by perturbation."""
    out = []
    for c in caches_in(cache_root):
        f = c.config()["feature"]
        if f.get("perturb") and {**f, "perturb": ""} == {**feature, "perturb": ""} \
                and (backend is None or c.backend == backend):
            out.append(c)
    return sorted(out, key=lambda c: c.config()["feature"]["perturb"])


def find_cache(cache_root: Path, feature_id: str | None = None, backend: str | None = None) -> FeatureCache:
    """The cache with this feature id (a prefix will do), or, when none is given, the only cache,
    or the only clean one among perturbed variants of it. The same features in both backends
    (after `convert-cache`) resolve to the Zarr one unless `backend` asks for the other."""
    caches = caches_in(cache_root)
    if feature_id:
        caches = [c for c in caches if c.root.name.startswith(feature_id)]
    if backend:
        caches = [c for c in caches if c.backend == backend]
    if len(caches) > 1:
        clean = [c for c in caches if not c.config()["feature"].get("perturb")]
        caches = clean if clean else caches
    if len(caches) > 1 and len({c.config()["feature_id"] for c in caches}) == 1:
        caches = [c for c in caches if c.backend == "zarr"] or caches
    if len(caches) == 1:
        return caches[0]
    names = ", ".join(c.root.name for c in caches_in(cache_root)) or "none"
    if not caches:
        raise CacheError(f"{cache_root}: no feature cache{' ' + feature_id if feature_id else ''}"
                         f"{' in backend ' + backend if backend else ''} (caches: {names}); "
                         f"run `extract` first")
    raise CacheError(f"{cache_root}: several feature caches ({names}); choose one with --feature-id")
