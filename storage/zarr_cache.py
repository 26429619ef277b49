"""The Zarr v3 feature cache (DESIGN.md sec. 4): one zarr shard per manifest shard, one chunk per
sample, done markers written last and atomically.

Layout of `RUN/cache/<feature-id>/`:
    config.json          the extraction config (also in the zarr group's attributes)
    features.zarr/       arrays dnf (N, C, S, S) (C = 3, or 3 per kept inversion step),
                         label (N,) int8, split, source, key (N,) strings
    done/00000.json      shard id, rows, counts, extract-time rejects, sha256 of the shard's data

Rows of manifest shard i are [i * shard_size, i * shard_size + len(shard)). A row whose image
failed to decode at extract time keeps label -1 and is listed in the shard's done marker.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.config import describe_differences
from storage.atomic import read_json, write_json_atomic

NOT_CACHED = -1  # label of a row whose image was rejected at extract time


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


class ZarrCache:
    """One feature cache folder backed by a Zarr v3 group."""

    backend = "zarr"

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def zarr_path(self) -> Path:
        return self.root / "features.zarr"

    @property
    def claims_dir(self) -> Path:
        """Runtime claim files live beside the cache, so the cache folder holds only its data."""
        return self.root.parent / f"{self.root.name}.claims"

    @property
    def done_dir(self) -> Path:
        return self.root / "done"

    def done_path(self, shard_id: int) -> Path:
        return self.done_dir / f"{shard_id:05d}.json"

    # -- creation ----------------------------------------------------------------------------
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
            group = zarr.open_group(self.zarr_path, mode="w", zarr_format=3)
            group.create_array(
                "dnf", shape=(num_rows, channels, size, size), dtype=dtype,
                chunks=(1, channels, size, size), shards=(shard_size, channels, size, size),
                compressors=ZstdCodec(level=3), fill_value=0)
            group.create_array("label", shape=(num_rows,), dtype="int8", chunks=(shard_size,),
                               fill_value=NOT_CACHED)
            for name in ("split", "source", "key"):
                group.create_array(name, shape=(num_rows,), dtype=str, chunks=(shard_size,))
            group.attrs.update({"dnf_pipeline": config})
            write_json_atomic(self.config_path, config)  # last: marks the cache as created

    # -- shards ------------------------------------------------------------------------------
    def done_marker(self, shard_id: int) -> dict | None:
        path = self.done_path(shard_id)
        return read_json(path) if path.exists() else None

    def done_shards(self) -> set[int]:
        if not self.done_dir.exists():
            return set()
        return {int(p.stem) for p in self.done_dir.glob("*.json") if p.stem.isdigit()}

    def write_shard(self, start: int, dnf: np.ndarray, label: np.ndarray, split: list[str],
                    source: list[str], key: list[str]) -> None:
        """Write rows [start, start + len(dnf)): exactly one zarr shard of every array."""
        end = start + len(dnf)
        group = zarr.open_group(self.zarr_path, mode="r+")
        group["dnf"][start:end] = dnf
        group["label"][start:end] = label.astype(np.int8)
        for name, values in (("split", split), ("source", source), ("key", key)):
            group[name][start:end] = np.array(values, dtype=object)

    def mark_done(self, shard_id: int, marker: dict) -> None:
        """Written last, atomically: from now on the shard counts as complete."""
        write_json_atomic(self.done_path(shard_id), marker)

    def open_read(self) -> zarr.Group:
        return zarr.open_group(self.zarr_path, mode="r")

    def read_rows(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """dnf, label and keys of rows [start, end), as stored."""
        group = self.open_read()
        return group["dnf"][start:end], group["label"][start:end], [str(k) for k in group["key"][start:end]]

    def size_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total


def caches_in(cache_root: Path) -> list[ZarrCache]:
    """Every feature cache folder under a run's `cache/`, by feature id."""
    if not cache_root.exists():
        return []
    return [ZarrCache(p) for p in sorted(cache_root.iterdir()) if (p / "config.json").exists()]


def perturbed_siblings(cache_root: Path, feature: dict) -> list[ZarrCache]:
    """Caches of the same features as `feature` computed on perturbed images, by perturbation."""
    out = []
    for c in caches_in(cache_root):
        f = c.config()["feature"]
        if f.get("perturb") and {**f, "perturb": ""} == {**feature, "perturb": ""}:
            out.append(c)
    return sorted(out, key=lambda c: c.config()["feature"]["perturb"])


def find_cache(cache_root: Path, feature_id: str | None = None) -> ZarrCache:
    """The cache with this feature id (a prefix will do), or, when none is given, the only cache,
    or the only clean one among perturbed variants of it."""
    caches = caches_in(cache_root)
    if feature_id:
        caches = [c for c in caches if c.root.name.startswith(feature_id)]
    elif len(caches) > 1:
        clean = [c for c in caches if not c.config()["feature"].get("perturb")]
        caches = clean if len(clean) == 1 else caches
    if len(caches) == 1:
        return caches[0]
    names = ", ".join(c.root.name for c in caches_in(cache_root)) or "none"
    if not caches:
        raise CacheError(f"{cache_root}: no feature cache{' ' + feature_id if feature_id else ''} "
                         f"(caches: {names}); run `extract` first")
    raise CacheError(f"{cache_root}: several feature caches ({names}); choose one with --feature-id")
