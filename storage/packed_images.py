"""Packed raw shards (`shard --pack`): the original bytes of each manifest shard's images in one
tar, `RUN/packed/NNNNN.tar`, members `<key><original suffix>` in row order, so a GPU box reads a
few large files instead of millions of small ones. Bytes are copied, never re-encoded; a tar is
written under a temporary name and renamed when complete. `extract` reads a shard from its tar when
there is one, else from the original files."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

from storage.locations import StoragePath, as_path, location
from storage.locations.base import RangeReader
from storage.run import Entry


def pack_path(run_root: StoragePath | str, shard_id: int) -> StoragePath:
    """Where manifest shard `shard_id`'s packed tar lives."""
    return as_path(run_root) / "packed" / f"{shard_id:05d}.tar"


def member_name(entry: Entry) -> str:
    """`<key><suffix>`: the key, with the original file's suffix when it is a plain one."""
    suffix = Path(entry.path).suffix.lower()
    return entry.key + (suffix if suffix and suffix.isascii() and suffix[1:].isalnum() else ".img")


def _write_members(f: BinaryIO, entries: list[Entry]) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for e in entries:
            data = as_path(e.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != e.key:
                raise ValueError(f"{e.path}: changed while packing (its sha256 no longer matches)")
            info = tarfile.TarInfo(member_name(e))
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def write_pack(path: StoragePath, entries: list[Entry]) -> int:
    """Write the entries' original bytes into the tar at `path`; return its size in bytes.
    A file whose bytes no longer match its key raises ValueError naming it. On object storage the
    tar goes through an fsspec file, which creates the object whole when it is closed."""
    location(path).write_streamed(path, lambda f: _write_members(f, entries))
    return path.stat().st_size


class PackReader:
    """Bytes of single images of one packed shard, by key (pread at offsets read from the headers)."""

    def __init__(self, path: StoragePath):
        self.path = as_path(path)
        with self.path.open("rb") as f, tarfile.open(fileobj=f, mode="r") as tar:
            self.index = {m.name.split(".", 1)[0]: (m.offset_data, m.size) for m in tar.getmembers()}
        size = self.path.stat().st_size
        if any(offset + n > size for offset, n in self.index.values()):  # tarfile reads past the end
            raise tarfile.ReadError(f"truncated: {size} bytes, its members need more")
        self._fd: RangeReader | None = None
        self._pid = -1

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def read(self, key: str) -> bytes:
        """The original bytes of the image with this key."""
        if self._fd is None or self._pid != os.getpid():  # one descriptor per (worker) process
            self._fd, self._pid = location(self.path).open_reader(self.path), os.getpid()
        offset, size = self.index[key]
        return self._fd.read(offset, size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}
