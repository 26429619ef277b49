"""What every feature cache folder has, whatever its backend (DESIGN.md sec. 4): `config.json`,
`done/NNNNN.json` markers written last and atomically with a backend-independent checksum, claim
files beside the folder; and `FeatureCache`, the interface every backend implements.

Backends (registered in `storage.caches`): `storage.zarr_cache.ZarrCache` (Zarr v3, the default)
and `storage.wds_cache.WdsCache` (WebDataset tar shards). Rows of manifest shard i are
[i * shard_size, i * shard_size + len(shard)); a row whose image failed to decode at extract time
has label -1 and is listed in its done marker.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import numpy as np

from storage.atomic import dumps_json, encode_text, read_json, write_json_atomic
from storage.cache_config import CacheConfig, DoneMarker, ManifestRef
from storage.errors import UserError
from storage.locations import StoragePath, as_path, location
from storage.locations.base import LOCK_STALE_S

NOT_CACHED = -1  # label of a row whose image was rejected at extract time


class CacheError(UserError, RuntimeError):
    """A cache that cannot be used as asked; the message names the folder and what differs."""


def object_lock(path: StoragePath, stale_s: float = LOCK_STALE_S) -> AbstractContextManager[None]:
    """An exclusive lock made by exclusive creation (on object storage: a conditional PUT), as
    `Location.creation_lock` describes: a dead holder's lock is taken over."""
    return location(path).creation_lock(path, stale_s)


def storage_lock(path: StoragePath) -> AbstractContextManager[None]:
    """The lock `path`'s location offers (`Location.lock`: flock on a filesystem, a creation lock
    on object storage)."""
    return location(path).lock(path)


def shard_checksum(dnf: np.ndarray, label: np.ndarray, keys: list[str]) -> str:
    """sha256 of a shard's decoded data: independent of the backend and its compression."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(dnf).tobytes())
    h.update(np.ascontiguousarray(label, dtype=np.int8).tobytes())
    h.update("\n".join(keys).encode())
    return "sha256:" + h.hexdigest()


class RowReader(ABC):
    """Random access to single rows' stored arrays (opened in the process that reads)."""

    @abstractmethod
    def __getitem__(self, row: int) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 (optional: readers without files need not close)
        """Release open files (readers are also fine to drop)."""


class FeatureCache(ABC):
    """A cache folder: config, done markers, claims (here); the backend subclass stores the rows.

    A backend implements the abstract methods below, sets `backend` (its name in config.json and
    `--backend`), `folder_suffix` (appended to the feature id to name its folder) and
    `random_access` (False: training streams whole shards through `iter_shard` instead of reading
    rows at random), and gets one line in `storage.caches.BACKENDS`.
    """

    backend = ""
    folder_suffix = ""
    random_access = True
    format_version = 1  # of the backend's storage; a cache of another version is not written to

    def __init__(self, root: StoragePath | str):
        self.root = as_path(root)
        self._config: CacheConfig | None = None

    def lock(self) -> AbstractContextManager[None]:
        """The cache's lock, held while config.json and the layout are created or grown."""
        return storage_lock(self.root.parent / f"{self.root.name}.lock")

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

    def config(self) -> CacheConfig:
        """config.json, read once."""
        if self._config is None:
            if not self.exists():
                raise CacheError(f"{self.root}: no feature cache here (config.json missing); run `extract`")
            self._config = CacheConfig.read(read_json(self.config_path), str(self.config_path))
        return self._config

    def open_or_create(self, config: CacheConfig, extends: Callable[[ManifestRef], bool] | None = None,
                       vocabulary: Callable[[], dict[str, list[str]]] | None = None) -> None:
        """Create the cache for `config`, or check that the existing one was made with the same
        (`config.about` is informational and never compared). A cache of a manifest that `config`'s
        manifest extends (`extends(old manifest)`: a run grown by `shard --append`) grows to it:
        new rows, its shards, markers and data untouched. `vocabulary` gives the manifest's split and
        source names in their fixed order (`Run.vocabulary`, which reads the whole manifest: called
        only when a cache is created or grown), for backends that store codes."""
        def names() -> dict[str, list[str]]:
            return vocabulary() if vocabulary is not None else {"split": [], "source": []}

        with self.lock():
            if self.exists():
                old = self.config()
                diff = old.differences(config)
                only_grown = not old.differences(replace(config, manifest=old.manifest))
                if diff and only_grown and extends is not None and extends(old.manifest):
                    self._grow(config, names())
                    write_json_atomic(self.config_path, config.to_json())
                    self._config = config
                    return
                if old.format != config.format:
                    raise CacheError(
                        f"{self.root} is a format-{old.format} {self.backend} cache made by an older "
                        f"dnf-pipeline; this version writes format {config.format}. Extract into a new "
                        f"cache folder (--cache-dir, or remove this one); train, eval and verify still "
                        f"read it, and `convert-cache` copies it to the other backend.")
                if diff:
                    raise CacheError(
                        f"{self.root} was made with another config; refusing to mix features.\n  "
                        + "\n  ".join(diff)
                        + "\nUse the settings it was made with, or another cache folder.")
                return
            self.root.mkdir(parents=True, exist_ok=True)
            self._create(config, names())
            write_json_atomic(self.config_path, config.to_json())  # last: marks the cache as created
            self._config = config

    def done_marker(self, shard_id: int) -> DoneMarker | None:
        """The shard's done marker, or None while it is not done."""
        path = self.done_path(shard_id)
        try:  # one request on object storage (not an existence check, then a read)
            return DoneMarker.read(read_json(path), str(path))
        except FileNotFoundError:
            return None

    def is_done(self, shard_id: int) -> bool:
        """Whether the shard has its done marker (read now: another worker may just have made it)."""
        return self.done_marker(shard_id) is not None

    def done_shards(self) -> set[int]:
        """Ids of the shards with a done marker."""
        if not self.done_dir.exists():
            return set()
        return {int(p.stem) for p in self.done_dir.glob("*.json") if p.stem.isdigit()}

    def mark_done(self, marker: DoneMarker) -> None:
        """Written last, atomically: from now on the shard counts as complete (`Location.write_marker`:
        on object storage it is created with a conditional PUT: a second writer of the shard (whose
        data are the same bytes) finds it there and moves on; a different marker there is an error)."""
        path = self.done_path(marker.shard)
        if not location(path).write_marker(path, encode_text(dumps_json(marker.to_json()))):
            there = self.done_marker(marker.shard)
            if there is None or (there.rows, there.checksum) != (marker.rows, marker.checksum):
                raise CacheError(f"{path}: another worker marked shard {marker.shard:05d} done with "
                                 f"other data ({there and there.checksum} != {marker.checksum})")

    def damaged_shard(self, shard_id: int, problem: str) -> CacheError:
        """The error of a done shard whose data file is missing or short (a crash, a copy that lost
        files): it would read back as zeros, so every reader refuses it."""
        return CacheError(f"{self.root}: shard {shard_id:05d} is marked done but its data file "
                          f"{self.shard_file(shard_id)} is {problem}; run `extract --redo {shard_id}` to "
                          f"compute it again")

    def size_bytes(self) -> int:
        return sum(size for _, size in location(self.root).walk_files(self.root))

    # -- what a backend implements -----------------------------------------------------------
    @abstractmethod
    def _create(self, config: CacheConfig, vocabulary: dict[str, list[str]]) -> None:
        """Lay out the empty storage for `config` (config.json is written after this)."""

    @abstractmethod
    def _grow(self, config: CacheConfig, vocabulary: dict[str, list[str]]) -> None:
        """Make room for the rows of a grown manifest (config.json is rewritten after this)."""

    @abstractmethod
    def shard_file(self, shard_id: int) -> Path:
        """The file holding the shard's feature rows (checked by `verify`)."""

    @abstractmethod
    def write_shard(self, start: int, dnf: np.ndarray, label: np.ndarray, split: list[str],
                    source: list[str], key: list[str]) -> dict | None:
        """Write one manifest shard's rows [start, start + len(dnf)) as one unit. Returns what the
        done marker must carry for the backend to read the shard back (its `index`), or None."""

    @abstractmethod
    def read_rows(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """dnf, label and keys of rows [start, end) of one written shard, as stored."""

    @abstractmethod
    def shard_metadata(self, start: int, end: int) -> tuple[list[str], list[str]]:
        """split and source of rows [start, end) of one written shard."""

    @abstractmethod
    def index_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """label, split, source, key of every row; label -1 for rows without features, including
        every row of a shard not marked done."""

    @abstractmethod
    def row_reader(self) -> RowReader:
        """Random access to single rows' DNF."""

    def iter_shard(self, shard_id: int, rows: set[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(row, DNF) of the wanted rows of one done shard, in row order: what a training stream
        reads. This default reads the shard with `read_rows`; a backend may stream instead."""
        start, end = self.done_marker(shard_id).rows
        wanted = [r for r in range(start, end) if r in rows]
        if wanted:
            dnf, _, _ = self.read_rows(start, end)
            for r in wanted:
                yield r, dnf[r - start]
