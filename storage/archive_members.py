"""What the archive readers (`tar_members.py`, `zip_members.py`) share: a member as a pass over an
archive gives it, the error of an archive that cannot be read, and a seekable file object backed
by a storage location's ranged reads (`RangeFile`), so zipfile and tarfile read a local file or an
object on S3 alike: each read that misses its buffer is one `pread` or one ranged GET."""

from __future__ import annotations

import io
from dataclasses import dataclass

from storage.errors import UserError
from storage.locations import STORAGE_ERRORS, StoragePath, location
from storage.locations.base import RangeReader

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jxl",
                            ".avif", ".heic", ".ppm", ".pgm"})


class ArchiveError(UserError, ValueError):
    """A tar or zip archive that cannot be read (truncated, damaged, not an archive): the message
    names it and says why; `why` alone is the reason a reject of the archive gives."""

    def __init__(self, path: object, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = str(path), why


@dataclass(frozen=True, slots=True)
class Member:
    """One file in an archive: its name there, where its bytes start (a tar member's data; a zip
    member's local header), its size (a zip's uncompressed size), and its bytes when the pass read
    them (None: larger than the limit, or `refused`)."""

    name: str
    offset: int
    size: int
    data: bytes | None = None
    refused: str | None = None  # why the member is not read at all (a link, an encrypted entry)


class RangeFile(io.RawIOBase):
    """`reader` as a read-only, seekable file; `readahead`: the least a missed read fetches (large for
    a pass over the whole file, small for single members read by offset)."""

    def __init__(self, reader: RangeReader, readahead: int = 1 << 16):
        super().__init__()
        self.reader, self.readahead = reader, max(1, readahead)
        self.size = reader.size
        self.pos = 0
        self._start, self._buf = 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        """Up to `n` bytes from the current position (all that is left when `n` is negative)."""
        left = max(0, self.size - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        out = bytearray()
        while n > 0:
            i = self.pos - self._start
            if not 0 <= i < len(self._buf):
                self._buf = self.reader.read(self.pos, min(max(n, self.readahead), self.size - self.pos))
                self._start, i = self.pos, 0
                if not self._buf:  # the file shrank since its size was taken
                    break
            chunk = self._buf[i:i + n]
            out += chunk
            self.pos += len(chunk)
            n -= len(chunk)
        return bytes(out)

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.reader.close()
        super().close()


MISSING = "missing: no such file (a dangling symbolic link, or removed since it was listed)"


def unreadable(e: BaseException) -> str:
    """The reason a storage error gives (`unreadable: Too many levels of symbolic links`)."""
    return f"unreadable: {getattr(e, 'strerror', None) or e}"


def open_archive(path: StoragePath, readahead: int) -> RangeFile:
    """The archive at `path` as a seekable file; ArchiveError naming it when it is missing (a
    dangling link too) or cannot be opened (a symlink loop, no permission, an I/O error)."""
    try:
        return RangeFile(location(path).open_reader(path), readahead)
    except FileNotFoundError as e:
        raise ArchiveError(path, MISSING) from e
    except STORAGE_ERRORS as e:
        raise ArchiveError(path, unreadable(e)) from e
