"""Training data from a feature cache: an index of the usable rows, and a Dataset reading one
Zarr chunk per sample (each DataLoader worker opens the store once).

Reading goes through `ShardChunkReader`, a direct reader of the Zarr v3 sharding format for the
layout this project writes (one pread and one zstd decode per sample, the shard index read once
per file); zarr-python's general path costs about a millisecond per chunk, more than decoding the
PNG the reference reads. Any other layout falls back to zarr.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numcodecs
import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from storage.zarr_cache import NOT_CACHED, ZarrCache


@dataclass
class CacheIndex:
    """The rows of one split that hold features, with their labels, sources and keys."""

    rows: np.ndarray
    labels: np.ndarray
    sources: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, mask: np.ndarray) -> CacheIndex:
        idx = np.flatnonzero(mask)
        return CacheIndex(self.rows[idx], self.labels[idx], [self.sources[i] for i in idx],
                          [self.keys[i] for i in idx])


def cache_index(cache: ZarrCache, split: str, sources: list[str] | None = None) -> CacheIndex:
    """Rows of `split` (optionally of some sources) in done shards whose image was cached."""
    group = cache.open_read()
    done = np.zeros(group["label"].shape[0], dtype=bool)
    for s in cache.done_shards():
        start, end = cache.done_marker(s)["rows"]
        done[start:end] = True
    labels = group["label"][:]
    split_arr = np.asarray(group["split"][:], dtype=object)
    source_arr = np.asarray(group["source"][:], dtype=object)
    mask = done & (labels != NOT_CACHED) & (split_arr == split)
    if sources:
        mask &= np.isin(source_arr, sources)
    rows = np.flatnonzero(mask)
    keys = group["key"][:]
    return CacheIndex(rows, labels[rows].astype(np.int64), [str(source_arr[r]) for r in rows],
                      [str(keys[r]) for r in rows])


EMPTY = np.uint64(2**64 - 1)


class ShardChunkReader:
    """Rows of a sharded Zarr v3 array written with one chunk per row along axis 0 and
    [bytes, zstd] chunk codecs, index at the end: read straight from the shard files."""

    def __init__(self, array_path: Path):
        meta = json.loads((Path(array_path) / "zarr.json").read_text())
        self.path = Path(array_path)
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value", 0)
        shard = meta["codecs"][0]
        if shard["name"] != "sharding_indexed":
            raise ValueError("not sharded")
        conf = shard["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        index_codecs = [c["name"] for c in conf["index_codecs"]]
        chunk = conf["chunk_shape"]
        if (inner not in (["bytes"], ["bytes", "zstd"]) or index_codecs != ["bytes", "crc32c"]
                or conf.get("index_location", "end") != "end" or chunk[0] != 1
                or list(chunk[1:]) != list(self.shape[1:])
                or any(c.get("configuration", {}).get("endian", "little") != "little"
                       for c in conf["codecs"])):
            raise ValueError("layout not supported by the direct reader")
        self.zstd = numcodecs.Zstd() if "zstd" in inner else None
        self.rows_per_shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        self.row_shape = tuple(self.shape[1:])
        self.fds: dict[int, int] = {}
        self.indexes: dict[int, np.ndarray] = {}

    def _index(self, shard: int) -> tuple[int, np.ndarray] | None:
        if shard not in self.indexes:
            path = self.path / "c" / str(shard) / "/".join("0" * (len(self.shape) - 1))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            size = os.fstat(fd).st_size
            n = self.rows_per_shard * 16
            raw = os.pread(fd, n + 4, size - n - 4)
            self.fds[shard] = fd
            self.indexes[shard] = np.frombuffer(raw[:n], dtype="<u8").reshape(-1, 2)
        return self.fds[shard], self.indexes[shard]

    def __getitem__(self, row: int) -> np.ndarray:
        shard, j = divmod(int(row), self.rows_per_shard)
        found = self._index(shard)
        if found is None or found[1][j, 0] == EMPTY:
            return np.full(self.row_shape, self.fill, dtype=self.dtype)
        fd, index = found
        offset, nbytes = (int(v) for v in index[j])
        data = os.pread(fd, nbytes, offset)
        if self.zstd is not None:
            data = self.zstd.decode(data)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.row_shape)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.indexes.clear()


def open_rows(array_path: Path):
    """A row reader of a dnf array: the direct shard reader when the layout allows, else zarr."""
    try:
        return ShardChunkReader(array_path)
    except (ValueError, KeyError):
        return zarr.open_array(str(array_path), mode="r")


class CacheDataset(Dataset):
    """(stored DNF tensor, label) for each row of an index; decoding to float is the model's job."""

    def __init__(self, cache: ZarrCache, index: CacheIndex, variants: list[ZarrCache] | None = None,
                 seed: int = 0):
        self.zarr_paths = [str(cache.zarr_path)] + [str(v.zarr_path) for v in variants or []]
        self.index = index
        self.seed, self.epoch = seed, 0
        self._readers: list | None = None  # opened lazily, once per process

    def set_epoch(self, epoch: int) -> None:
        """Variant choices are drawn from (seed, epoch, sample): resumed runs repeat them."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._readers is None:
            self._readers = [open_rows(Path(p) / "dnf") for p in self.zarr_paths]
        variant = 0
        if len(self._readers) > 1:
            variant = int(np.random.default_rng([self.seed, self.epoch, i]).integers(len(self._readers)))
        x = self._readers[variant][int(self.index.rows[i])]
        return torch.from_numpy(np.array(x)), int(self.index.labels[i])
