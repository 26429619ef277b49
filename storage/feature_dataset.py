"""Training data from a feature cache, whatever its backend: an index of the usable rows, a
Dataset reading single rows through the backend's row reader (opened once per DataLoader worker),
and a stream of whole shards for backends that are read in sequence (`random_access = False`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
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


class ShardStream(IterableDataset):
    """Training samples streamed shard by shard: shard order shuffled per epoch, shards dealt to
    ranks and then to DataLoader workers, a shuffle buffer per worker. Yields (DNF, label, row) for
    the rows in `rows` (e.g. one split's); everything derives from (seed, epoch, rank, worker), so
    an epoch repeats exactly with the same number of ranks and workers."""

    def __init__(self, cache: FeatureCache, rows: np.ndarray, labels: np.ndarray, seed: int = 0,
                 buffer: int = 1000, rank: int = 0, world: int = 1):
        self.cache = cache
        self.shard_size = cache.config().shard_size
        self.done = sorted(cache.done_shards())
        self.labels = {int(r): int(y) for r, y in zip(rows, labels, strict=True)}
        self.seed, self.buffer, self.rank, self.world, self.epoch = seed, buffer, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_shards(self) -> list[int]:
        """This rank's shards for the current epoch (only shards that hold wanted rows)."""
        wanted = {r // self.shard_size for r in self.labels}
        shards = [s for s in self.done if s in wanted]
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(len(shards))
        return [shards[i] for i in order][self.rank::self.world]

    def rank_rows(self) -> int:
        """How many wanted rows this rank's shards hold this epoch."""
        mine = set(self.rank_shards())
        return sum(1 for r in self.labels if r // self.shard_size in mine)

    def _samples(self, shards: list[int]):
        rows = set(self.labels)
        for shard in shards:
            for row, x in self.cache.iter_shard(shard, rows):
                yield torch.from_numpy(np.array(x)), self.labels[row], row

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        buf = []
        for item in self._samples(self.rank_shards()[worker::workers]):
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf
