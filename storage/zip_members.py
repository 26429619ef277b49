"""Zip archives read in place (DiffusionDB's `part-NNNNNN.zip`, any zip of images): through the central
directory, over a file object backed by the storage location's ranged reads, so a zip on S3 is read
without downloading it. `shard` passes over the members in their order in the archive (large
sequential reads); `extract` keeps one open archive per zip and process and reads each member from
its local header (one or two ranged reads)."""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator

from storage.archive_members import ArchiveError, Member, open_archive
from storage.locations import StoragePath, as_path

PASS_READAHEAD = 8 << 20  # a pass over a whole zip: 8 MiB per read
MEMBER_READAHEAD = 1 << 16  # one member: its header and, for most images, all of its bytes in one read
# what zipfile raises for one damaged or unreadable member (CRC, bad local header, deflate stream)
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError, ValueError)


def open_zip(path: StoragePath | str, readahead: int = MEMBER_READAHEAD) -> zipfile.ZipFile:
    """The zip at `path` opened through its central directory; ArchiveError naming it when it is
    missing, not a zip, or truncated (a truncated zip has lost its central directory)."""
    path = as_path(path)
    f = open_archive(path, readahead)
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        f.close()
        raise ArchiveError(path, f"not a readable zip archive, or truncated (its central directory "
                           f"at the end is missing or damaged: {e})") from e


def close_zip(zf: zipfile.ZipFile) -> None:
    """Close a zip from `open_zip` and the reader under it (zipfile leaves a file it was given open)."""
    f = zf.fp
    zf.close()
    if f is not None:
        f.close()


def member_refusal(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member cannot be read at all (None: it can be tried)."""
    if info.flag_bits & 0x1:
        return "encrypted in the zip (a password is needed): not read"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                  zipfile.ZIP_LZMA):
        return f"compressed with method {info.compress_type}, which Python's zipfile cannot read"
    return None


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    """A member's bytes (at most `max_bytes` + 1 are inflated: a zip bomb stops there); ValueError
    with the reason when the member is damaged."""
    try:
        with zf.open(info) as f:
            return f.read(max_bytes + 1)
    except MEMBER_ERRORS as e:
        raise ValueError(f"damaged in the zip: {e}") from e


def iter_zip(path: StoragePath | str, max_bytes: int) -> Iterator[Member]:
    """Every file member of the zip at `path` (folders left out), in the order of their bytes in the
    archive, with its bytes (None when its size is over `max_bytes`; `refused` when it cannot be
    read: encrypted, damaged, an unknown compression). ArchiveError when the zip cannot be opened."""
    zf = open_zip(path, PASS_READAHEAD)
    try:
        for info in sorted(zf.infolist(), key=lambda i: i.header_offset):
            if info.is_dir():
                continue
            refused = member_refusal(info)
            if refused is None and info.file_size <= max_bytes:
                try:
                    data = read_member(zf, info, max_bytes)
                except ValueError as e:
                    yield Member(info.filename, info.header_offset, info.file_size, refused=str(e))
                    continue
                yield Member(info.filename, info.header_offset, info.file_size, data)
            else:
                yield Member(info.filename, info.header_offset, info.file_size, refused=refused)
    finally:
        close_zip(zf)


class ZipMembers:
    """Members of zips read through their central directories: one open archive per zip and process
    (a loader worker opens its own), each member found by its recorded local-header offset."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[zipfile.ZipFile, dict[int, zipfile.ZipInfo]]] = {}
        self._pid = os.getpid()

    def read(self, archive: str, name: str, offset: int, size: int) -> bytes:
        """The bytes of member `name`, `size` bytes uncompressed, whose local header is at `offset` in
        the zip `archive` (a path or URL); ArchiveError when the zip no longer holds it so, ValueError
        with the reason when the member cannot be read."""
        if self._pid != os.getpid():  # a forked loader worker opens its own
            self._open, self._pid = {}, os.getpid()
        if archive not in self._open:
            zf = open_zip(archive)
            self._open[archive] = (zf, {i.header_offset: i for i in zf.infolist()})
        zf, by_offset = self._open[archive]
        info = by_offset.get(offset)
        if info is None or info.filename != name or info.file_size != size:
            raise ArchiveError(archive, f"no member {name!r} of {size} bytes at byte {offset}: the zip "
                                        f"changed since `shard`")
        refused = member_refusal(info)
        if refused is not None:
            raise ValueError(refused)
        return read_member(zf, info, size)

    def close(self) -> None:
        """Close the archives this process opened."""
        if self._pid == os.getpid():
            for zf, _ in self._open.values():
                close_zip(zf)
        self._open = {}

    def __getstate__(self) -> dict:
        return {"_open": {}, "_pid": -1}
