"""Training data from a feature cache: an index of the usable rows, and a Dataset reading one
Zarr chunk per sample (each DataLoader worker opens the store once).

Reading goes through `ShardChunkReader`, a direct reader of the Zarr v3 sharding format for the
layout this project writes (one pread and one zstd decode per sample, the shard index read once
per file); zarr-python's general path costs about a millisecond per chunk, more than decoding the
PNG the reference reads. Any other layout falls back to zarr.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numcodecs
import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from storage.cache_folder import NOT_CACHED, FeatureCache


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


def cache_index(cache: FeatureCache, split: str, sources: list[str] | None = None) -> CacheIndex:
    """Rows of `split` (optionally of some sources) in done shards whose image was cached."""
    labels, split_arr, source_arr, keys = cache.index_arrays()  # not-done rows have NOT_CACHED
    mask = (labels != NOT_CACHED) & (split_arr == split)
    if sources:
        mask &= np.isin(source_arr, sources)
    rows = np.flatnonzero(mask)
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

    def __init__(self, cache: FeatureCache, index: CacheIndex, variants: list[FeatureCache] | None = None,
                 seed: int = 0):
        self.caches = [cache, *(variants or [])]
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
            self._readers = [c.row_reader() for c in self.caches]
        variant = 0
        if len(self._readers) > 1:
            variant = int(np.random.default_rng([self.seed, self.epoch, i]).integers(len(self._readers)))
        x = self._readers[variant][int(self.index.rows[i])]
        return torch.from_numpy(np.array(x)), int(self.index.labels[i])


class WdsStream(IterableDataset):
    """Training samples streamed from a WebDataset cache's tars: tar order shuffled per epoch, tars
    dealt to ranks and then to DataLoader workers, a shuffle buffer per worker. Yields (DNF, label,
    row) for the rows in `rows` (e.g. one split's); everything derives from (seed, epoch, rank,
    worker), so an epoch repeats exactly with the same number of ranks and workers."""

    def __init__(self, cache, rows: np.ndarray, labels: np.ndarray, seed: int = 0, buffer: int = 1000,
                 rank: int = 0, world: int = 1):
        self.tars = [str(path) for _, path in cache.tar_files()]
        self.shard_size = cache._shard_size()
        self.labels = {int(r): int(y) for r, y in zip(rows, labels, strict=True)}
        self.seed, self.buffer, self.rank, self.world, self.epoch = seed, buffer, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_tars(self) -> list[str]:
        """This rank's tars for the current epoch (only tars that hold wanted rows)."""
        wanted = {r // self.shard_size for r in self.labels}
        tars = [t for t in self.tars if int(Path(t).stem) in wanted]
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(len(tars))
        return [tars[i] for i in order][self.rank::self.world]

    def rank_rows(self) -> int:
        """How many wanted rows this rank's tars hold this epoch."""
        mine = {int(Path(t).stem) for t in self.rank_tars()}
        return sum(1 for r in self.labels if r // self.shard_size in mine)

    def _samples(self, tars: list[str]):
        import webdataset as wds

        for sample in wds.tarfile_samples([{"url": t} for t in tars]):
            meta = json.loads(sample["json"])
            if meta["row"] in self.labels:
                x = np.load(io.BytesIO(sample["dnf.npy"]), allow_pickle=False)
                yield torch.from_numpy(x), self.labels[meta["row"]], meta["row"]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        buf = []
        for item in self._samples(self.rank_tars()[worker::workers]):
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf
