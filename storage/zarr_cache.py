"""The Zarr v3 feature cache (DESIGN.md sec. 4): one zarr shard per manifest shard, one chunk per
sample; config, done markers and claims as every cache folder has them (storage/cache_folder.py).

Layout of `RUN/cache/<feature-id>/`:
    config.json          the extraction config (also in the zarr group's attributes)
    features.zarr/       arrays dnf (N, C, S, S) (C = 3, or 3 per kept inversion step),
                         label (N,) int8, split, source, key (N,) strings
    done/00000.json      shard id, rows, counts, extract-time rejects, sha256 of the shard's data

Reading single rows goes through `ShardChunkReader`, a direct reader of the Zarr v3 sharding format
for the layout this project writes (one pread and one zstd decode per sample, the shard index read
once per file); zarr-python's general path costs about a millisecond per chunk, more than decoding
the PNG the reference reads. Any other layout falls back to zarr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.cache_config import CacheConfig
from storage.cache_folder import NOT_CACHED, FeatureCache, RowReader

EMPTY = np.uint64(2**64 - 1)


class ShardChunkReader(RowReader):
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


class ZarrArrayRows(RowReader):
    """Rows of any zarr array through zarr-python (the fallback of the direct reader)."""

    def __init__(self, array_path: Path):
        self.array = zarr.open_array(str(array_path), mode="r")

    def __getitem__(self, row: int) -> np.ndarray:
        return self.array[int(row)]


def open_rows(array_path: Path) -> RowReader:
    """A row reader of a dnf array: the direct shard reader when the layout allows, else zarr."""
    try:
        return ShardChunkReader(array_path)
    except (ValueError, KeyError):
        return ZarrArrayRows(array_path)


class ZarrCache(FeatureCache):
    """One feature cache folder backed by a Zarr v3 group."""

    backend = "zarr"

    @property
    def zarr_path(self) -> Path:
        return self.root / "features.zarr"

    def _create(self, config: CacheConfig) -> None:
        num_rows, shard_size = config.manifest.row_count, config.manifest.shard_size
        channels, size, _ = config.row_shape()
        dtype = config.dtype
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
        group.attrs.update({"dnf_pipeline": json.loads(json.dumps(config.to_json(), sort_keys=True))})

    def _grow(self, config: CacheConfig) -> None:
        """Longer arrays (only their zarr.json changes: shard files keep their bytes)."""
        group = zarr.open_group(self.zarr_path, mode="r+")
        for name in ("dnf", "label", "split", "source", "key"):
            array = group[name]
            array.resize((config.manifest.row_count, *array.shape[1:]))
        group.attrs.update({"dnf_pipeline": json.loads(json.dumps(config.to_json(), sort_keys=True))})

    # -- shards ------------------------------------------------------------------------------
    def shard_file(self, shard_id: int) -> Path:
        """The file holding the shard's DNF rows."""
        return self.zarr_path / "dnf" / "c" / str(shard_id) / "0" / "0" / "0"

    def write_shard(self, start: int, dnf: np.ndarray, label: np.ndarray, split: list[str],
                    source: list[str], key: list[str]) -> None:
        """Write rows [start, start + len(dnf)): exactly one zarr shard of every array (the
        done marker needs no index: the arrays hold everything)."""
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
            start, end = self.done_marker(s).rows
            label[start:end] = stored[start:end]
        return (label, np.asarray(group["split"][:], dtype=object),
                np.asarray(group["source"][:], dtype=object), np.asarray(group["key"][:], dtype=object))

    def shard_metadata(self, start: int, end: int) -> tuple[list[str], list[str]]:
        """split and source of rows [start, end)."""
        group = self.open_read()
        return [str(v) for v in group["split"][start:end]], [str(v) for v in group["source"][start:end]]

    def row_reader(self) -> RowReader:
        """Random access to single rows' DNF (opened in the process that reads)."""
        return open_rows(self.zarr_path / "dnf")
