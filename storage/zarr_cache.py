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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.atomic import write_bytes_atomic
from storage.cache_config import CacheConfig
from storage.cache_folder import NOT_CACHED, CacheError, FeatureCache, RowReader
from storage.locations import StoragePath, as_path, location
from storage.locations.base import RangeReader

EMPTY = np.uint64(2**64 - 1)
# zstd level of the DNF chunks. Measured on 256x256 reference-encoded DNF (benchmarks/bench.py
# --host-only): level 1 takes 0.50 ms a chunk and keeps 72 % of the bytes, level 3 (format 1's)
# 1.28 ms and 74 %: noise maps gain nothing from the slower levels.
ZSTD_LEVEL = 1


def zarr_store(path: str | StoragePath) -> Any:
    """What zarr-python opens for `path` (`Location.zarr_store`: the local path, or an fsspec store
    for a URL, each process its own, that deletes keys literally)."""
    path = as_path(path)
    return location(path).zarr_store(path)


@dataclass(frozen=True)
class RowShardLayout:
    """A sharded Zarr v3 array with one chunk per row along axis 0, [bytes, zstd] (or [bytes])
    chunk codecs in little-endian order and its shard index at the end ([bytes, crc32c]): the layout
    this project writes, which the direct reader and writer handle; anything else goes to zarr."""

    path: StoragePath
    shape: tuple[int, ...]
    dtype: np.dtype
    fill: float
    rows_per_shard: int
    zstd_level: int | None  # None: chunks stored uncompressed
    zstd_checksum: bool

    @classmethod
    def read(cls, array_path: Path) -> RowShardLayout:
        """The layout of the array at `array_path`; ValueError when it is another one."""
        array_path = as_path(array_path)
        meta = json.loads((array_path / "zarr.json").read_text())
        shape = tuple(meta["shape"])
        shard = meta["codecs"][0]
        if shard["name"] != "sharding_indexed":
            raise ValueError("not sharded")
        conf = shard["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        index_codecs = [c["name"] for c in conf["index_codecs"]]
        chunk = conf["chunk_shape"]
        if (inner not in (["bytes"], ["bytes", "zstd"]) or index_codecs != ["bytes", "crc32c"]
                or conf.get("index_location", "end") != "end" or chunk[0] != 1
                or list(chunk[1:]) != list(shape[1:])
                or any(c.get("configuration", {}).get("endian", "little") != "little"
                       for c in conf["codecs"] + conf["index_codecs"])):
            raise ValueError("layout not supported by the direct reader")
        zstd = conf["codecs"][1].get("configuration", {}) if "zstd" in inner else None
        return cls(array_path, shape, np.dtype(meta["data_type"]).newbyteorder("<"),
                   meta.get("fill_value", 0), meta["chunk_grid"]["configuration"]["chunk_shape"][0],
                   None if zstd is None else int(zstd.get("level", 0)),
                   bool(zstd and zstd.get("checksum", False)))

    def shard_path(self, shard: int) -> StoragePath:
        return self.path / "c" / str(shard) / "/".join("0" * (len(self.shape) - 1))

    def codec(self) -> numcodecs.Zstd | None:
        return None if self.zstd_level is None else numcodecs.Zstd(self.zstd_level, self.zstd_checksum)


def _compress_pool() -> ThreadPoolExecutor:
    """Threads that compress a shard's chunks in parallel (zstd releases the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="zstd")
    return _POOL


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: a new pool is made on first use."""
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def encode_row_shard(layout: RowShardLayout, rows: np.ndarray) -> bytes | None:
    """The bytes of one shard file holding `rows` (its first rows; the rest empty), as zarr-python
    writes them: chunks equal to the fill value left out, the others compressed (in parallel) and
    concatenated in row order, then the index of (offset, size) pairs and its crc32c. None when
    every chunk is empty (zarr-python then writes no file)."""
    rows = np.ascontiguousarray(rows, dtype=layout.dtype)
    present = [j for j in range(len(rows)) if not np.all(rows[j] == layout.fill)]
    codec = layout.codec()
    if not present:
        return None
    if codec is None:
        parts = [rows[j].tobytes() for j in present]
    else:
        parts = list(_compress_pool().map(lambda j: codec.encode(rows[j]), present))
    index = np.full((layout.rows_per_shard, 2), EMPTY, dtype="<u8")
    offset = 0
    for j, part in zip(present, parts, strict=True):
        index[j] = (offset, len(part))
        offset += len(part)
    index_bytes = index.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
    return b"".join(parts) + index_bytes + crc


def shard_index(layout: RowShardLayout, reader: RangeReader) -> np.ndarray | str:
    """The (offset, size) pairs of an open shard file, or why the file cannot hold them (too short,
    an index that fails its crc32c, chunks that lie past the index): a half-written file."""
    size = reader.size
    n = layout.rows_per_shard * 16
    if size < n + 4:
        return f"{size} bytes, shorter than its index"
    raw = reader.read(size - n - 4, n + 4)
    if np.uint32(google_crc32c.value(raw[:n])).astype("<u4").tobytes() != raw[n:]:
        return "damaged: its shard index fails its crc32c"
    index = np.frombuffer(raw[:n], dtype="<u8").reshape(-1, 2)
    present = index[:, 0] != EMPTY
    if present.any() and int((index[present, 0] + index[present, 1]).max()) > size - n - 4:
        return f"{size} bytes, shorter than its chunks"
    return index


class ShardChunkReader(RowReader):
    """Rows of an array in the `RowShardLayout`, read straight from the shard files: one pread (a
    ranged GET on object storage) and one zstd decode per row, each shard's index read once.
    `required(shard)` tells whether a shard must have a file (a done shard with cached rows); a
    missing or short one then raises the `CacheError` that `damaged(shard, problem)` makes,
    instead of reading as zeros."""

    def __init__(self, array_path: Path, required=None, damaged=None):
        layout = RowShardLayout.read(array_path)
        self.path, self.shape, self.dtype, self.fill = layout.path, layout.shape, layout.dtype, layout.fill
        self.layout = layout
        self.zstd = numcodecs.Zstd() if layout.zstd_level is not None else None
        self.rows_per_shard = layout.rows_per_shard
        self.row_shape = tuple(self.shape[1:])
        self.fds: dict[int, RangeReader] = {}
        self.indexes: dict[int, np.ndarray] = {}
        self.required = required or (lambda shard: False)
        self.damaged = damaged or (lambda shard, why: CacheError(f"{self.path}: shard {shard}: {why}"))

    def _index(self, shard: int) -> tuple[RangeReader, np.ndarray] | None:
        if shard not in self.indexes:
            path = self.layout.shard_path(shard)
            try:
                fd = location(path).open_reader(path)
            except FileNotFoundError:
                if self.required(shard):
                    raise self.damaged(shard, "missing") from None
                return None
            index = shard_index(self.layout, fd)
            if isinstance(index, str):
                fd.close()
                raise self.damaged(shard, index)
            self.fds[shard] = fd
            self.indexes[shard] = index
        return self.fds[shard], self.indexes[shard]

    def __getitem__(self, row: int) -> np.ndarray:
        shard, j = divmod(int(row), self.rows_per_shard)
        found = self._index(shard)
        if found is None or found[1][j, 0] == EMPTY:
            return np.full(self.row_shape, self.fill, dtype=self.dtype)
        fd, index = found
        offset, nbytes = (int(v) for v in index[j])
        data = fd.read(offset, nbytes)
        if self.zstd is not None:
            data = self.zstd.decode(data)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.row_shape)

    def close(self) -> None:
        for fd in self.fds.values():
            fd.close()
        self.fds.clear()
        self.indexes.clear()


class ZarrArrayRows(RowReader):
    """Rows of any zarr array through zarr-python (the fallback of the direct reader)."""

    def __init__(self, array_path: Path):
        self.array = zarr.open_array(zarr_store(as_path(array_path)), mode="r")

    def __getitem__(self, row: int) -> np.ndarray:
        return self.array[int(row)]


def write_row_shard(layout: RowShardLayout, shard: int, rows: np.ndarray) -> None:
    """Write one shard file of the array (under a temporary name, then renamed): the bytes
    zarr-python would write for the same rows, at a fraction of its cost."""
    data = encode_row_shard(layout, rows)
    path = layout.shard_path(shard)
    if data is None:  # every row empty: as zarr-python, no file
        path.unlink(missing_ok=True)
        return
    # left by a killed writer (we hold the claim); object storage has none
    location(path).remove_stale(path.parent, [f".{path.name}.*.tmp"])
    # one PUT, or a synced temporary file renamed: whole or absent, on disk before the done marker;
    # the shard's claim is checked as the write's last step (storage.locations.fenced)
    write_bytes_atomic(path, data)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under `path` (zarr-python's chunk files of a shard);
    nothing to do on object storage, where a PUT that returned is durable (`Location.sync_tree`)."""
    location(path).sync_tree(path)


def open_rows(array_path: Path, required=None, damaged=None) -> RowReader:
    """A row reader of a dnf array: the direct shard reader when the layout allows, else zarr."""
    try:
        return ShardChunkReader(array_path, required, damaged)
    except (ValueError, KeyError):
        return ZarrArrayRows(array_path)


def keys_to_bytes(keys: list[str]) -> np.ndarray:
    """sha256 hex keys as (n, 32) uint8, how format 2 stores them."""
    return np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype=np.uint8).reshape(len(keys), 32)


def bytes_to_keys(raw: np.ndarray) -> list[str]:
    """(n, 32) uint8 back to hex keys ("" for rows never written)."""
    return [row.tobytes().hex() if row.any() else "" for row in np.asarray(raw)]


class ZarrCache(FeatureCache):
    """One feature cache folder backed by a Zarr v3 group.

    Format 2 (this version) keeps every array in a Zarr v3 core data type, so any v3 client
    (tensorstore, zarr-python, ...) reads all of them: `dnf` uint8 or float16, `label` int8, `key`
    (N, 32) uint8 (the sha256 bytes), `split` and `source` int16 codes (-1: no row) whose names are
    the array's attribute `names`. Format 1 (before) stored key, split and source as zarr-python's
    variable-length strings: such caches are read as before; extracting into one is refused."""

    backend = "zarr"
    format_version = 2
    CODED = ("split", "source")

    @property
    def zarr_path(self) -> StoragePath:
        return self.root / "features.zarr"

    def _create(self, config: CacheConfig, vocabulary: dict[str, list[str]]) -> None:
        num_rows, shard_size = config.manifest.row_count, config.manifest.shard_size
        channels, size, _ = config.row_shape()
        group = zarr.open_group(zarr_store(self.zarr_path), mode="w", zarr_format=3)
        group.create_array(
            "dnf", shape=(num_rows, channels, size, size), dtype=config.dtype,
            chunks=(1, channels, size, size), shards=(shard_size, channels, size, size),
            compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0)
        group.create_array("label", shape=(num_rows,), dtype="int8", chunks=(shard_size,),
                           fill_value=NOT_CACHED)
        group.create_array("key", shape=(num_rows, 32), dtype="uint8", chunks=(shard_size, 32), fill_value=0)
        for name in self.CODED:
            group.create_array(name, shape=(num_rows,), dtype="int16", chunks=(shard_size,), fill_value=-1,
                               attributes={"names": list(vocabulary.get(name, []))})
        # keys sorted as in config.json, so a cache rebuilt from that file has the same bytes
        group.attrs.update({"dnf_pipeline": json.loads(json.dumps(config.to_json(), sort_keys=True))})

    def _grow(self, config: CacheConfig, vocabulary: dict[str, list[str]]) -> None:
        """Longer arrays, the appended names after the others (only zarr.json files change: shard
        files keep their bytes)."""
        group = zarr.open_group(zarr_store(self.zarr_path), mode="r+", zarr_format=3)
        for name in ("dnf", "label", "split", "source", "key"):
            array = group[name]
            array.resize((config.manifest.row_count, *array.shape[1:]))
            if name in self.CODED and array.dtype.kind == "i":
                names = list(array.attrs.get("names", []))
                array.attrs["names"] = names + [n for n in vocabulary.get(name, []) if n not in names]
        group.attrs.update({"dnf_pipeline": json.loads(json.dumps(config.to_json(), sort_keys=True))})

    # -- shards ------------------------------------------------------------------------------
    def shard_file(self, shard_id: int) -> StoragePath:
        """The file holding the shard's DNF rows."""
        return self.zarr_path / "dnf" / "c" / str(shard_id) / "0" / "0" / "0"

    def _codes(self, group: zarr.Group, name: str, values: list[str]) -> np.ndarray:
        """int16 codes of `values` in the array's `names` (the manifest's, set at creation); a name
        missing there (a cache made outside `extract`) is appended under the cache lock, so a code
        never changes its name."""
        names = list(group[name].attrs.get("names", []))
        if set(values) - set(names):
            with self.lock():
                array = zarr.open_array(zarr_store(self.zarr_path / name), mode="r+", zarr_format=3)
                names = list(array.attrs.get("names", []))
                names += sorted(set(values) - set(names))
                array.attrs["names"] = names
        code = {n: i for i, n in enumerate(names)}
        return np.array([code[v] for v in values], dtype=np.int16)

    def write_shard(self, start: int, dnf: np.ndarray, label: np.ndarray, split: list[str],
                    source: list[str], key: list[str]) -> None:
        """Write rows [start, start + len(dnf)): exactly one zarr shard (or chunk) of every array (the
        done marker needs no index: the arrays hold everything). The DNF shard's bytes are written
        directly (`write_row_shard`), the same bytes zarr-python writes."""
        if self.config().format != self.format_version:
            raise CacheError(f"{self.root}: a format-{self.config().format} cache (made by an older "
                             f"version) cannot take new shards; extract into a new cache folder")
        end = start + len(dnf)
        shard = start // self.config().shard_size
        self._clear_partial(shard)
        group = zarr.open_group(zarr_store(self.zarr_path), mode="r+", zarr_format=3)
        layout = self._dnf_layout()
        synced = ["label", "key", "split", "source"]  # write_row_shard syncs its own file
        if layout is not None and start % layout.rows_per_shard == 0 and len(dnf) <= layout.rows_per_shard:
            write_row_shard(layout, start // layout.rows_per_shard, dnf)
        else:
            group["dnf"][start:end] = dnf
            synced.append("dnf")
        group["label"][start:end] = label.astype(np.int8)
        group["key"][start:end] = keys_to_bytes(key)
        for name, values in (("split", split), ("source", source)):
            group[name][start:end] = self._codes(group, name, values)
        for name in synced:  # on disk before the done marker
            fsync_tree(self.zarr_path / name / "c" / str(shard))

    def _clear_partial(self, shard: int) -> None:
        """Remove the `*.partial` files a killed zarr-python write left for this shard's chunks
        (never read, but they would stay forever; this worker holds the shard's claim). Object
        storage has none: zarr-python writes each chunk object with one PUT."""
        for name in ("dnf", "label", "key", "split", "source"):
            chunks = self.zarr_path / name / "c"
            location(chunks).remove_stale(chunks, [f"{shard}.*.partial", f"{shard}/**/*.partial"])

    def _dnf_layout(self) -> RowShardLayout | None:
        """The dnf array's layout when the direct writer handles it (every cache this project
        makes), else None (zarr-python writes)."""
        try:
            return RowShardLayout.read(self.zarr_path / "dnf")
        except (ValueError, KeyError):
            return None

    def open_read(self) -> zarr.Group:
        return zarr.open_group(zarr_store(self.zarr_path), mode="r", zarr_format=3)

    def _strings(self, group: zarr.Group, name: str, start: int = 0, end: int | None = None) -> np.ndarray:
        """key, split or source of rows [start, end) as an object array of str, in either format."""
        array = group[name]
        raw = array[start:end]
        if array.dtype.kind in "OUT":  # format 1: strings as stored
            return np.asarray(raw, dtype=object)
        if name == "key":
            return np.asarray(bytes_to_keys(raw), dtype=object)
        names = np.asarray([*array.attrs.get("names", []), ""], dtype=object)  # code -1 -> ""
        return names[raw]

    def check_shard_data(self, shard_id: int) -> None:
        """A done shard with cached rows must have its whole data file (else CacheError, --redo)."""
        layout = self._dnf_layout()
        if layout is None or not self._required(shard_id):
            return
        path = self.shard_file(shard_id)
        try:
            fd = location(path).open_reader(path)
        except FileNotFoundError:
            raise self.damaged_shard(shard_id, "missing") from None
        try:
            problem = shard_index(layout, fd)
        finally:
            fd.close()
        if isinstance(problem, str):
            raise self.damaged_shard(shard_id, problem)

    def _required(self, shard_id: int) -> bool:
        marker = self.done_marker(shard_id)
        return marker is not None and marker.cached > 0

    def read_rows(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """dnf, label and keys of rows [start, end), as stored."""
        self.check_shard_data(start // self.config().shard_size)
        group = self.open_read()
        return (group["dnf"][start:end], group["label"][start:end],
                [str(k) for k in self._strings(group, "key", start, end)])

    def index_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """label, split, source, key of every row (label -1 where nothing is cached, and in shards
        not marked done: a half-written shard's rows do not count)."""
        group = self.open_read()
        label = np.full(group["label"].shape[0], NOT_CACHED, dtype=np.int8)
        stored = group["label"][:]
        for s in self.done_shards():
            start, end = self.done_marker(s).rows
            label[start:end] = stored[start:end]
        return (label, self._strings(group, "split"), self._strings(group, "source"),
                self._strings(group, "key"))

    def shard_metadata(self, start: int, end: int) -> tuple[list[str], list[str]]:
        """split and source of rows [start, end)."""
        group = self.open_read()
        return ([str(v) for v in self._strings(group, "split", start, end)],
                [str(v) for v in self._strings(group, "source", start, end)])

    def row_reader(self) -> RowReader:
        """Random access to single rows' DNF (opened in the process that reads)."""
        return open_rows(self.zarr_path / "dnf", self._required, self.damaged_shard)
