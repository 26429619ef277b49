"""The WebDataset feature cache: one tar per manifest shard, for caches on object storage or
network filesystems that serve a few large files better than many chunks.

Layout of `RUN/cache/<feature-id>-wds/`:
    config.json          the extraction config ("backend": "webdataset")
    wds/00000.tar        per cached image, in row order: <key>.dnf.npy (the stored DNF array),
                         <key>.cls (label, 0 or 1), <key>.json (row, key, label, split, source)
    done/00000.json      as the Zarr cache's marker, plus "index": key, label, split, source of every
                         row and the byte offset and size of each row's .dnf.npy member (-1: none)

A tar is written under a temporary name and renamed when complete; its done marker comes after.
Images rejected at extract time have no members (they are listed in the marker), so any WebDataset
reader sees only usable samples. Tar headers carry no time or owner: the same rows give the same
bytes. The checksum in the marker is computed from the decoded rows, as for Zarr, so a cache
converted between the backends (`convert-cache`) keeps it.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from storage.cache_config import CacheConfig, DoneMarker
from storage.cache_folder import NOT_CACHED, CacheError, FeatureCache, RowReader
from storage.locations import StoragePath, location
from storage.locations.base import RangeReader


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def npy_bytes(array: np.ndarray) -> bytes:
    """The array as a .npy file's bytes (what `<key>.dnf.npy` holds)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _write_tar(f: BinaryIO, start: int, dnf: np.ndarray, label: np.ndarray, split: list[str],
               source: list[str], key: list[str], offset: list[int], size: list[int]) -> None:
    """Write the shard's cached rows as tar members into `f`, recording each .dnf.npy's offset
    and size (in place) for the done marker's index."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j in range(len(dnf)):
            if int(label[j]) == NOT_CACHED:
                continue
            meta = {"row": start + j, "key": key[j], "label": int(label[j]), "split": split[j],
                    "source": source[j]}
            for suffix, data in (("dnf.npy", npy_bytes(dnf[j])), ("cls", str(int(label[j])).encode()),
                                 ("json", json.dumps(meta, sort_keys=True).encode())):
                info, body = _member(f"{key[j]}.{suffix}", data)
                if suffix == "dnf.npy":  # the data follows its header
                    offset[j] = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
                    size[j] = len(data)
                tar.addfile(info, body)


class WdsCache(FeatureCache):
    """One feature cache folder of WebDataset tar shards."""

    backend = "webdataset"
    folder_suffix = "-wds"
    random_access = False  # training streams the tars

    def __init__(self, root: Path | str):
        super().__init__(root)
        self._written: dict[int, dict] = {}  # shards this object wrote -> their index (read-back)

    @property
    def shards_dir(self) -> StoragePath:
        return self.root / "wds"

    def shard_file(self, shard_id: int) -> StoragePath:
        return self.shards_dir / f"{shard_id:05d}.tar"

    def _create(self, config: CacheConfig, vocabulary: dict[str, list[str]]) -> None:
        self.shards_dir.mkdir(parents=True, exist_ok=True)

    def _grow(self, config: CacheConfig, vocabulary: dict[str, list[str]]) -> None:
        """Nothing to do: a new shard is a new tar."""

    def write_shard(self, start: int, dnf: np.ndarray, label: np.ndarray, split: list[str],
                    source: list[str], key: list[str]) -> dict:
        """Write rows [start, start + len(dnf)) as one tar (temporary name, then renamed); return
        the shard's index for its done marker."""
        shard_id = start // self.config().shard_size
        final = self.shard_file(shard_id)
        offset, size = [-1] * len(dnf), [0] * len(dnf)  # of each row's .dnf.npy data; -1: no member
        location(final).write_streamed(  # temporary name + rename, or an upload that appears whole
            final, lambda f: _write_tar(f, start, dnf, label, split, source, key, offset, size))
        index = {"key": list(key), "label": [int(v) for v in label], "split": list(split),
                 "source": list(source), "offset": offset, "size": size}
        self._written[shard_id] = index
        return index

    def mark_done(self, marker: DoneMarker) -> None:
        """The marker, which must carry the shard's index (what `write_shard` returned), written last."""
        if marker.index is None:
            raise CacheError(f"{self.root}: shard {marker.shard:05d}: a done marker without the tar's index")
        self._written.pop(marker.shard, None)
        super().mark_done(marker)

    def _shard_index(self, shard_id: int) -> dict:
        index = self._written.get(shard_id)
        if index is None:
            marker = self.done_marker(shard_id)
            if marker is None:
                raise CacheError(f"{self.root}: shard {shard_id:05d} is not done")
            index = marker.index
        return index

    # -- reading -----------------------------------------------------------------------------
    def check_shard_data(self, shard_id: int, index: dict | None = None) -> None:
        """A done shard's tar must hold every member its index points at (else CacheError, --redo)."""
        index = index or self._shard_index(shard_id)
        need = max((o + n for o, n in zip(index["offset"], index["size"], strict=True) if o >= 0), default=0)
        if not need:
            return
        try:
            size = self.shard_file(shard_id).stat().st_size
        except FileNotFoundError:
            raise self.damaged_shard(shard_id, "missing") from None
        if size < need:
            raise self.damaged_shard(shard_id, f"{size} bytes, shorter than the {need} its rows need")

    def read_rows(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """dnf, label and keys of rows [start, end) of one done shard, rejected rows as zeros."""
        config = self.config()
        shard_id = start // config.shard_size
        index = self._shard_index(shard_id)
        self.check_shard_data(shard_id, index)
        dnf = np.zeros((end - start, *config.row_shape()), dtype=config.dtype)
        with self.shard_file(shard_id).open("rb") as f:
            for j, (offset, size) in enumerate(zip(index["offset"], index["size"], strict=True)):
                if offset >= 0:
                    f.seek(offset)
                    dnf[j] = np.load(io.BytesIO(f.read(size)), allow_pickle=False)
        return dnf, np.asarray(index["label"], dtype=np.int8), list(index["key"])

    def shard_metadata(self, start: int, end: int) -> tuple[list[str], list[str]]:
        """split and source of rows [start, end) of a done shard."""
        index = self._shard_index(start // self.config().shard_size)
        return list(index["split"]), list(index["source"])

    def index_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """label, split, source, key of every row, from the done markers (label -1 elsewhere)."""
        n = self.config().manifest.row_count
        label = np.full(n, NOT_CACHED, dtype=np.int8)
        split, source, key = (np.full(n, "", dtype=object) for _ in range(3))
        for s in self.done_shards():
            marker = self.done_marker(s)
            a, b = marker.rows
            index = marker.index
            label[a:b] = index["label"]
            split[a:b], source[a:b], key[a:b] = index["split"], index["source"], index["key"]
        return label, split, source, key

    def row_reader(self) -> WdsRowReader:
        return WdsRowReader(self)

    def iter_shard(self, shard_id: int, rows: set[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(row, DNF) of the wanted rows of one done shard, streamed through its tar in order (what
        a WebDataset reader of an object store does)."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        self.check_shard_data(shard_id)
        path = self.shard_file(shard_id)
        with path.open("rb") as stream:
            for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
                row = json.loads(sample["json"])["row"]
                if row in rows:
                    yield row, np.load(io.BytesIO(sample["dnf.npy"]), allow_pickle=False)


class WdsRowReader(RowReader):
    """Random access to single rows of a WebDataset cache (pread at the offsets in the markers)."""

    def __init__(self, cache: WdsCache):
        self.cache = cache
        self.shard_size = cache.config().shard_size
        self.fds: dict[int, RangeReader] = {}
        self.index: dict[int, dict] = {}

    def __getitem__(self, row: int) -> np.ndarray:
        shard, j = divmod(int(row), self.shard_size)
        if shard not in self.index:
            self.index[shard] = self.cache.done_marker(shard).index
            self.cache.check_shard_data(shard, self.index[shard])
            path = self.cache.shard_file(shard)
            self.fds[shard] = location(path).open_reader(path)
        index = self.index[shard]
        offset = index["offset"][j]
        if offset < 0:
            raise CacheError(f"{self.cache.root}: row {row} holds no features (rejected at extract)")
        return np.load(io.BytesIO(self.fds[shard].read(offset, index["size"][j])), allow_pickle=False)

    def close(self) -> None:
        for fd in self.fds.values():
            fd.close()
        self.fds.clear()
