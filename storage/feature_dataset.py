"""Training data from a feature cache: an index of the usable rows, and a Dataset reading one
Zarr chunk per sample (each DataLoader worker opens the store once)."""

from __future__ import annotations

from dataclasses import dataclass

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


class CacheDataset(Dataset):
    """(stored DNF tensor, label) for each row of an index; decoding to float is the model's job."""

    def __init__(self, cache: ZarrCache, index: CacheIndex):
        self.zarr_path = str(cache.zarr_path)
        self.index = index
        self._dnf = None  # opened lazily, once per process

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._dnf is None:
            self._dnf = zarr.open_group(self.zarr_path, mode="r")["dnf"]
        x = self._dnf[int(self.index.rows[i])]
        return torch.from_numpy(np.ascontiguousarray(x)), int(self.index.labels[i])
