"""The run directory: run.json (`RunInfo`), manifest shards (`Entry` rows), rejects and duplicates
(DESIGN.md sec. 4)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from storage.atomic import read_json, read_jsonl, write_json_atomic, write_jsonl_atomic
from storage.errors import RecordError, UserError
from storage.locations import StoragePath, as_path, is_url

LABELS = {0: "real", 1: "fake"}


@dataclass(frozen=True)
class Entry:
    """One image of the manifest: its key is the sha256 of its bytes. What its header said (format
    to subsampling) is recorded by `shard` for `audit` and per-format metrics; None in manifests
    written before that was recorded."""

    key: str
    path: str
    label: int  # 0 real, 1 fake
    source: str
    split: str
    size: int
    format: str | None = None  # container format as Pillow names it: JPEG, PNG, WEBP, ...
    width: int | None = None
    height: int | None = None
    mode: str | None = None  # colour mode: RGB, L, RGBA, P, ...
    exif: bool | None = None
    quality: int | None = None  # JPEG quality estimated from the quantisation tables
    subsampling: str | None = None  # JPEG chroma subsampling: 4:4:4, 4:2:2, 4:2:0
    # The input source that reads it (stages.domain.sources), recorded only where the address alone
    # does not tell it; None (and absent in manifests written before) = inferred from the address.
    kind: str | None = None
    offset: int | None = None  # where its `size` bytes start in the file its address names (a tar member)

    def to_json(self) -> dict:
        """The manifest row; `kind` and `offset` only where set, so rows of files and parquet rows
        are written as they always were."""
        d = asdict(self)
        for optional in ("kind", "offset"):
            if d[optional] is None:
                del d[optional]
        return d


def within_roots(path: str, roots: list[str]) -> bool:
    """True when `path`, normalised lexically (`..` resolved, symlinks kept), lies in a root."""
    # kind question allowed: path syntax (a URL compared as written, a local path normalised lexically)
    norm = str(as_path(path)) if is_url(path) else os.path.normpath(path)
    for root in roots:
        root = str(as_path(root)) if is_url(root) else os.path.normpath(root)
        if norm == root or norm.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


@dataclass(frozen=True)
class Append:
    """One `shard --append`: its inputs and options, and the shards it added after the others."""

    inputs: tuple[str, ...]
    options: dict
    first_shard: int
    num_shards: int
    images: int
    files: int
    rejects: int
    duplicates: int

    @classmethod
    def from_json(cls, d: dict) -> Append:
        return cls(**{**d, "inputs": tuple(d["inputs"])})

    def to_json(self) -> dict:
        return {**asdict(self), "inputs": list(self.inputs)}


@dataclass(frozen=True)
class RunInfo:
    """run.json: what was sharded and how, and the manifest's shape; written last by `shard`.
    Counts are totals over the first shard run and its appends (`appends`, in order)."""

    shard_size: int
    num_shards: int
    images: int
    files: int
    rejects: int
    duplicates: int
    inputs: tuple[str, ...] = ()
    roots: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    version: str = ""
    tool: str = "dnf-pipeline"
    appends: tuple[Append, ...] = ()

    def segments(self) -> list[tuple[int, int, int]]:
        """(first shard, shards, images) of the first shard run and of each append: within one,
        every shard is full but the last."""
        first = self.appends[0].first_shard if self.appends else self.num_shards
        base = (0, first, self.images - sum(a.images for a in self.appends))
        return [base] + [(a.first_shard, a.num_shards, a.images) for a in self.appends]

    def shard_len(self, shard_id: int) -> int:
        """Images in a manifest shard."""
        for first, count, images in self.segments():
            if first <= shard_id < first + count:
                return min(self.shard_size, images - (shard_id - first) * self.shard_size)
        return 0

    def shard_start(self, shard_id: int) -> int:
        """The first row of a shard: rows of shard i are [i * shard_size, i * shard_size + len)."""
        return shard_id * self.shard_size

    @property
    def rows(self) -> int:
        """Rows a cache of this manifest holds: the end of the last shard (rows after a partial
        shard that an append followed are never used)."""
        last = self.num_shards - 1
        return self.shard_start(last) + self.shard_len(last) if self.num_shards else 0

    @classmethod
    def from_json(cls, d: dict) -> RunInfo:
        return cls(**{**d, "inputs": tuple(d.get("inputs", ())), "roots": tuple(d.get("roots", ())),
                      "appends": tuple(Append.from_json(a) for a in d.get("appends", ()))})

    def to_json(self) -> dict:
        d = {**asdict(self), "inputs": list(self.inputs), "roots": list(self.roots),
             "appends": [a.to_json() for a in self.appends]}
        if not self.appends:
            del d["appends"]  # run.json of a run never appended to is as it always was
        return d


class RunError(UserError, RuntimeError):
    """A run directory is missing or inconsistent; the message says which file and what to do."""


class Run:
    """Paths and readers of one run directory."""

    def __init__(self, root: StoragePath | str):
        self.root = as_path(root)
        self._info: RunInfo | None = None

    # -- paths -------------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def rejects_path(self) -> Path:
        return self.root / "rejects.jsonl"

    @property
    def duplicates_path(self) -> Path:
        return self.root / "duplicates.jsonl"

    @property
    def cache_root(self) -> Path:
        return self.root / "cache"

    def shard_path(self, shard_id: int) -> Path:
        return self.shards_dir / f"{shard_id:05d}.jsonl"

    # -- reading -----------------------------------------------------------------------------
    def info(self) -> RunInfo:
        """run.json, read once; a clear error when the run was never sharded."""
        if self._info is None:
            if not self.run_json.exists():
                raise RunError(
                    f"{self.run_json} not found: {self.root} is not a sharded run; "
                    f"run `dnf-pipeline shard DATA --run {self.root}` first"
                )
            try:
                self._info = RunInfo.from_json(read_json(self.run_json))
            except TypeError as e:
                raise RecordError(f"{self.run_json}: not a run.json record ({e})") from e
        return self._info

    def num_shards(self) -> int:
        return self.info().num_shards

    def shard_len(self, shard_id: int) -> int:
        """Images in a manifest shard, derived from run.json (every shard is full but the last)."""
        return self.info().shard_len(shard_id)

    def shard_entries(self, shard_id: int) -> list[Entry]:
        path = self.shard_path(shard_id)
        if not path.exists():
            raise RunError(f"{path} is missing: the manifest of this run is incomplete; re-run `shard`")
        return [Entry(**row) for row in read_jsonl(path)]

    def entries(self) -> list[Entry]:
        """Every entry of the manifest, in row order."""
        return [e for s in range(self.num_shards()) for e in self.shard_entries(s)]

    def vocabulary(self) -> dict[str, list[str]]:
        """The split and source names of the manifest in a fixed order: those of the first shard run
        sorted, then each append's new ones sorted, so that names get codes that never change."""
        out: dict[str, list[str]] = {"split": [], "source": []}
        for first, count, _ in self.info().segments():
            found: dict[str, set[str]] = {"split": set(), "source": set()}
            for s in range(first, first + count):
                for e in self.shard_entries(s):
                    found["split"].add(e.split)
                    found["source"].add(e.source)
            for name, values in found.items():
                out[name] += sorted(values - set(out[name]))
        return out

    def rejects(self) -> list[dict]:
        return read_jsonl(self.rejects_path)

    def duplicates(self) -> list[dict]:
        return read_jsonl(self.duplicates_path)

    def manifest_fingerprint(self, num_shards: int | None = None) -> str:
        """sha256 over the manifest shard files (the first `num_shards` of them): a cache records
        it to refuse a re-sharded run, and to know an appended run for a grown one."""
        h = hashlib.sha256()
        for s in range(self.num_shards() if num_shards is None else num_shards):
            h.update(self.shard_path(s).read_bytes())
        return h.hexdigest()

    # -- writing -----------------------------------------------------------------------------
    def write_manifest(self, shards: list[list[Entry]], rejects: list[dict], duplicates: list[dict],
                       info: RunInfo, first_shard: int = 0) -> None:
        """Write shard files (numbered from `first_shard`; an append keeps the ones before),
        rejects, duplicates, and run.json last (it marks the manifest complete)."""
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        for i, shard in enumerate(shards, first_shard):
            write_jsonl_atomic(self.shard_path(i), [e.to_json() for e in shard])
        write_jsonl_atomic(self.rejects_path, rejects)
        write_jsonl_atomic(self.duplicates_path, duplicates)
        write_json_atomic(self.run_json, info.to_json())
        self._info = info
