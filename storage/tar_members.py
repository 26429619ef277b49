"""Tar archives read in place (WebDataset tars as img2dataset writes them, any plain tar): one pass
over the members in archive order (`shard`: read once, in large sequential reads), and one member's
bytes by its recorded data offset (`extract`: one ranged read each, as packed tars are read).

A tar that ends inside a member, inside a header, or without its end-of-archive blocks, or that
holds a damaged header, raises `ArchiveError` naming it, after the complete members before the
damage were given: they are kept, and the archive's reject says what was lost."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator

from storage.archive_members import ArchiveError, Member, RangeFile, open_archive, unreadable
from storage.locations import STORAGE_ERRORS, StoragePath, as_path, location
from storage.locations.base import RangeReader

PASS_READAHEAD = 8 << 20  # a pass over a whole tar: 8 MiB per read (one ranged GET on object storage)


def _end_is_clean(f: RangeFile, offset: int) -> str | None:
    """Why the tar does not end properly at `offset` (where tarfile stopped), None when it does:
    an end-of-archive block of zeros must be there."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    if not block:
        return f"it ends at byte {offset} without the end-of-archive blocks: truncated"
    if len(block) < tarfile.BLOCKSIZE and block.strip(b"\0"):
        return f"it ends inside a member header at byte {offset}: truncated"
    if block.strip(b"\0"):
        return f"the header at byte {offset} is damaged (no valid tar header there)"
    return None


def iter_tar(path: StoragePath | str, max_bytes: int,
             wanted: Callable[[str], bool] | None = None) -> Iterator[Member]:
    """Every member of the tar at `path` but folders, in archive order, with its bytes (None when it is
    over `max_bytes`, or `wanted` says no to its name: a pass that lists the images and reads their
    metadata only; links and other non-files carry `refused`). Raises ArchiveError naming the
    archive when it is not a tar, is damaged or truncated, or cannot be read, after the members
    read before."""
    path = as_path(path)
    f = open_archive(path, PASS_READAHEAD)
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            raise ArchiveError(path, f"not a readable tar archive ({e})") from e
        except STORAGE_ERRORS as e:
            raise ArchiveError(path, unreadable(e)) from e
        try:
            while (m := tar.next()) is not None:
                if m.isdir():
                    continue
                if not m.isreg() or m.issparse():
                    yield Member(m.name, m.offset_data, m.size, refused="not a regular file in the tar "
                                 "(a link or special file): no image bytes")
                    continue
                if m.offset_data + m.size > f.size:
                    raise tarfile.ReadError("unexpected end of data")
                if m.size > max_bytes or (wanted is not None and not wanted(m.name)):
                    yield Member(m.name, m.offset_data, m.size)
                    continue
                reader = tar.extractfile(m)
                data = reader.read() if reader is not None else b""
                if len(data) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
                yield Member(m.name, m.offset_data, m.size, data)
            why = _end_is_clean(f, tar.offset)
        except (tarfile.TarError, EOFError) as e:
            why = f"damaged or truncated ({e})"
        except STORAGE_ERRORS as e:
            why = unreadable(e)
        if why is not None:
            raise ArchiveError(path, f"{why}; the members before it were read, the rest are lost")


def read_spans(path: StoragePath | str, spans: list[tuple[int, int]]) -> Iterator[bytes | str]:
    """The bytes at each (offset, size) of the tar at `path`, in one pass of large reads when the
    spans are in archive order (one reader, one buffer: memory bounded by a member); a span the tar
    no longer holds, or a read that fails, gives its reason instead. ArchiveError when the tar cannot
    be opened."""
    f = open_archive(as_path(path), PASS_READAHEAD)
    with f:
        for offset, size in spans:
            if offset < 0 or offset + size > f.size:
                yield (f"the tar is {f.size} bytes, too few for a member of {size} bytes at {offset}: "
                       f"it changed since it was listed")
                continue
            try:
                f.seek(offset)
                data = f.read(size)
            except STORAGE_ERRORS as e:
                yield unreadable(e)
                continue
            yield data if len(data) == size else "the tar shrank while it was read"


class TarMembers:
    """Members of tars read by their recorded data offsets: one open reader per tar and process."""

    def __init__(self) -> None:
        self._readers: dict[str, RangeReader] = {}
        self._pid = os.getpid()

    def read(self, tar: str, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of the tar `tar` (a path or URL): one ranged read."""
        if self._pid != os.getpid():  # a forked loader worker opens its own
            self._readers, self._pid = {}, os.getpid()
        reader = self._readers.get(tar)
        if reader is None:
            path = as_path(tar)
            reader = self._readers[tar] = location(path).open_reader(path)
        if offset < 0 or offset + size > reader.size:
            raise ArchiveError(tar, f"{reader.size} bytes, too few for a member of {size} bytes at "
                                    f"{offset}: the tar changed since `shard`")
        return reader.read(offset, size)

    def close(self) -> None:
        """Close the readers this process opened."""
        if self._pid == os.getpid():
            for reader in self._readers.values():
                reader.close()
        self._readers = {}

    def __getstate__(self) -> dict:
        return {"_readers": {}, "_pid": -1}
