"""The run directory: run.json, manifest shards, rejects and duplicates (DESIGN.md sec. 4)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.atomic import read_json, read_jsonl, write_json_atomic, write_jsonl_atomic

LABELS = {0: "real", 1: "fake"}


@dataclass(frozen=True)
class Entry:
    """One image of the manifest: its key is the sha256 of its bytes."""

    key: str
    path: str
    label: int  # 0 real, 1 fake
    source: str
    split: str
    size: int

    def to_json(self) -> dict:
        return asdict(self)


def within_roots(path: str, roots: list[str]) -> bool:
    """True when `path`, normalised lexically (`..` resolved, symlinks kept), lies in a root."""
    norm = os.path.normpath(path)
    for root in roots:
        root = os.path.normpath(root)
        if norm == root or norm.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


class RunError(RuntimeError):
    """A run directory is missing or inconsistent; the message says which file and what to do."""


class Run:
    """Paths and readers of one run directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

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
    def info(self) -> dict:
        """run.json; a clear error when the run was never sharded."""
        if not self.run_json.exists():
            raise RunError(
                f"{self.run_json} not found: {self.root} is not a sharded run; "
                f"run `dnf-pipeline shard DATA --run {self.root}` first"
            )
        return read_json(self.run_json)

    def num_shards(self) -> int:
        return int(self.info()["num_shards"])

    def shard_len(self, shard_id: int) -> int:
        """Images in a manifest shard, derived from run.json (every shard is full but the last)."""
        info = self.info()
        return max(0, min(info["shard_size"], info["images"] - shard_id * info["shard_size"]))

    def shard_entries(self, shard_id: int) -> list[Entry]:
        path = self.shard_path(shard_id)
        if not path.exists():
            raise RunError(f"{path} is missing: the manifest of this run is incomplete; re-run `shard`")
        return [Entry(**row) for row in read_jsonl(path)]

    def entries(self) -> list[Entry]:
        """Every entry of the manifest, in row order."""
        return [e for s in range(self.num_shards()) for e in self.shard_entries(s)]

    def rejects(self) -> list[dict]:
        return read_jsonl(self.rejects_path)

    def duplicates(self) -> list[dict]:
        return read_jsonl(self.duplicates_path)

    def manifest_fingerprint(self) -> str:
        """sha256 over the manifest shard files: a cache records it to refuse a re-sharded run."""
        h = hashlib.sha256()
        for s in range(self.num_shards()):
            h.update(self.shard_path(s).read_bytes())
        return h.hexdigest()

    # -- writing -----------------------------------------------------------------------------
    def write_manifest(self, shards: list[list[Entry]], rejects: list[dict], duplicates: list[dict],
                       info: dict) -> None:
        """Write shard files, rejects, duplicates, and run.json last (it marks the manifest complete)."""
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        for i, shard in enumerate(shards):
            write_jsonl_atomic(self.shard_path(i), [e.to_json() for e in shard])
        write_jsonl_atomic(self.rejects_path, rejects)
        write_jsonl_atomic(self.duplicates_path, duplicates)
        write_json_atomic(self.run_json, info)
