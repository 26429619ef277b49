"""The Zarr v3 feature cache (DESIGN.md sec. 4): one zarr shard per manifest shard, one chunk per
sample; config, done markers and claims as every cache folder has them (storage/cache_folder.py).

Layout of `RUN/cache/<feature-id>/`:
    config.json          the extraction config (also in the zarr group's attributes)
    features.zarr/       arrays dnf (N, C, S, S) (C = 3, or 3 per kept inversion step),
                         label (N,) int8, split, source, key (N,) strings
    done/00000.json      shard id, rows, counts, extract-time rejects, sha256 of the shard's data
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.cache_folder import NOT_CACHED, FeatureCache


class ZarrCache(FeatureCache):
    """One feature cache folder backed by a Zarr v3 group."""

    backend = "zarr"

    @property
    def zarr_path(self) -> Path:
        return self.root / "features.zarr"

    def _create(self, config: dict, num_rows: int, shard_size: int, size: int, dtype: str,
                channels: int) -> None:
        group = zarr.open_group(self.zarr_path, mode="w", zarr_format=3)
        group.create_array(
            "dnf", shape=(num_rows, channels, size, size), dtype=dtype,
            chunks=(1, channels, size, size), shards=(shard_size, channels, size, size),
            compressors=ZstdCodec(level=3), fill_value=0)
        group.create_array("label", shape=(num_rows,), dtype="int8", chunks=(shard_size,),
                           fill_value=NOT_CACHED)
        for name in ("split", "source", "key"):
            group.create_array(name, shape=(num_rows,), dtype=str, chunks=(shard_size,))
        # keys sorted as in config.json, so a cache rebuilt from that file has the same bytes
        group.attrs.update({"dnf_pipeline": json.loads(json.dumps(config, sort_keys=True))})

    # -- shards ------------------------------------------------------------------------------
    def shard_file(self, shard_id: int) -> Path:
        """The file holding the shard's DNF rows."""
        return self.zarr_path / "dnf" / "c" / str(shard_id) / "0" / "0" / "0"

    def write_shard(self, start: int, dnf: np.ndarray, label: np.ndarray, split: list[str],
                    source: list[str], key: list[str]) -> None:
        """Write rows [start, start + len(dnf)): exactly one zarr shard of every array."""
        end = start + len(dnf)
        group = zarr.open_group(self.zarr_path, mode="r+")
        group["dnf"][start:end] = dnf
        group["label"][start:end] = label.astype(np.int8)
        for name, values in (("split", split), ("source", source), ("key", key)):
            group[name][start:end] = np.array(values, dtype=object)

    def open_read(self) -> zarr.Group:
        return zarr.open_group(self.zarr_path, mode="r")

    def read_rows(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """dnf, label and keys of rows [start, end), as stored."""
        group = self.open_read()
        return group["dnf"][start:end], group["label"][start:end], [str(k) for k in group["key"][start:end]]

    def index_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """label, split, source, key of every row (label -1 where nothing is cached, and in shards
        not marked done: a half-written shard's rows do not count)."""
        group = self.open_read()
        label = np.full(group["label"].shape[0], NOT_CACHED, dtype=np.int8)
        stored = group["label"][:]
        for s in self.done_shards():
            start, end = self.done_marker(s)["rows"]
            label[start:end] = stored[start:end]
        return (label, np.asarray(group["split"][:], dtype=object),
                np.asarray(group["source"][:], dtype=object), np.asarray(group["key"][:], dtype=object))

    def shard_metadata(self, start: int, end: int) -> tuple[list[str], list[str]]:
        """split and source of rows [start, end)."""
        group = self.open_read()
        return [str(v) for v in group["split"][start:end]], [str(v) for v in group["source"][start:end]]

    def row_reader(self):
        """Random access to single rows' DNF (opened in the process that reads)."""
        from storage.feature_dataset import open_rows

        return open_rows(self.zarr_path / "dnf")
