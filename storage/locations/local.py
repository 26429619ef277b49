"""The local disk (any POSIX path, a shared filesystem included): atomic writes by rename, exclusive
creation by `link`, which a rename-based writer never half-creates."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from storage.locations.base import Location, RangeReader, TooLarge, check_fence


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


class FileReader(RangeReader):
    """A file descriptor read with `pread`."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


class LocalLocation(Location):
    """Paths on a POSIX filesystem."""

    def write_whole(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path, data)
        try:
            check_fence()
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def write_streamed(self, path: Path, fill: Callable[[BinaryIO], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # left by a killed writer (the caller holds the shard's claim)
        self.remove_stale(path.parent, [f".{path.name}.*.tmp"])
        # a unique name, not the pid: a pid repeats on other hosts and in other PID namespaces
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "xb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            check_fence()
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # an error in `fill` leaves no file behind
            raise
        fsync_dir(path.parent)

    def create_exclusive(self, path: Path, data: bytes) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path, data)
        try:
            os.link(tmp, path)  # fails if the name exists; readers never see a half-written file
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
        fsync_dir(path.parent)
        return True

    @contextmanager
    def staged(self, folder: Path) -> Iterator[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder

    def open_reader(self, path: Path) -> FileReader:
        return FileReader(path)

    def read_range(self, path: Path, offset: int, size: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def size(self, path: Path) -> int:
        return path.stat().st_size

    def mtime(self, path: Path) -> float:
        return path.stat().st_mtime

    def walk_files(self, folder: Path) -> list[tuple[Path, int]]:
        out = []
        for dirpath, dirs, files in os.walk(folder, followlinks=False):
            linked = [name for name in dirs if os.path.islink(os.path.join(dirpath, name))]
            for name in linked:  # not followed, but listed: a caller says it is not taken
                out.append((os.path.join(dirpath, name), os.lstat(os.path.join(dirpath, name)).st_size))
            for name in files:
                full = os.path.join(dirpath, name)
                try:
                    size = os.path.getsize(full)
                except OSError:  # a symlink whose target is gone, a loop (ELOOP), no permission:
                    size = os.lstat(full).st_size  # the link's own size; reading it says why
                out.append((full, size))
        return [(Path(full), size) for full, size in sorted(out)]

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def absolute(self, path: Path) -> Path:
        return Path(os.path.abspath(path))

    def relative(self, folder: Path, text: str) -> str | None:
        if not os.path.isabs(text):
            return None
        return os.path.relpath(text, os.path.abspath(folder)).replace(os.sep, "/")

    def read_many(self, paths: list[str], limit: int | None = None) -> dict[str, bytes | OSError]:
        out: dict[str, bytes | OSError] = {}
        for p in paths:
            try:
                if os.path.isdir(p):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), p)
                size = os.path.getsize(p)
                if limit is not None and size > limit:
                    raise TooLarge(p, size)
                with open(p, "rb") as f:
                    out[p] = f.read()
            except OSError as e:
                out[p] = e
        return out

    def remove_tree(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def remove_empty_folder(self, folder: Path) -> None:
        try:
            folder.rmdir()  # only an empty one: ENOTEMPTY otherwise
        except OSError:
            pass

    def write_marker(self, path: Path, data: bytes) -> bool:
        self.write_whole(path, data)
        return True

    @contextmanager
    def lock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def zarr_store(self, path: Path) -> Path:
        return path

    def sync_tree(self, path: Path) -> None:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            for dirpath, _, files in os.walk(path):
                for name in files:
                    self.sync_tree(Path(dirpath) / name)
                fsync_dir(Path(dirpath))
        if path.parent.exists():
            fsync_dir(path.parent)

    def remove_stale(self, folder: Path, patterns: list[str]) -> None:
        for pattern in patterns:
            for stale in folder.glob(pattern):
                stale.unlink(missing_ok=True)

    def file_for_ranged_reads(self, path: Path) -> str:
        return str(path)

    def file_for_whole_read(self, path: Path) -> Path:
        return path
