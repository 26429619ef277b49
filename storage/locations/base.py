"""What a storage location must do beyond reading and writing whole files: the interface that the
local disk (`local.py`) and object storage through fsspec (`object_store.py`) implement.

A path of either kind offers the pathlib subset the stages use (`/`, `name`, `parent`, `exists`,
`read_bytes`, `write_bytes`, `iterdir`, `glob`, `unlink`, `stat`, `open`); the operations here are
the ones whose meaning differs between a POSIX filesystem and an object store."""

from __future__ import annotations

import contextvars
import errno
import hashlib
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, BinaryIO

from storage.lock_holder import holder_fields, holder_gone

LOCK_STALE_S = 120.0  # a creation lock older than this is a dead holder's: taken over

_FENCE: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("fence", default=None)


@contextmanager
def fenced(check: Callable[[], None]) -> Iterator[None]:
    """While the block runs (in this thread), every write that makes a file appear or replaces it
    (`write_whole`, `write_streamed`) calls `check()` as its last step before it does (before the
    rename, the PUT, the upload's completion); `check` raises to stop the write. What a worker
    uses to check its shard's claim as late as it can."""
    token = _FENCE.set(check)
    try:
        yield
    finally:
        _FENCE.reset(token)


def check_fence() -> None:
    """Call the check of the enclosing `fenced` block, if any (itself unfenced: a check that
    writes, a claim's heartbeat, is not checked again)."""
    check = _FENCE.get()
    if check is not None:
        token = _FENCE.set(None)
        try:
            check()
        finally:
            _FENCE.reset(token)


class RangeReader(ABC):
    """An open file or object read by byte ranges (one `pread` or one ranged GET each)."""

    size: int

    @abstractmethod
    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes from `offset`."""

    def close(self) -> None:  # noqa: B027 (optional: an object holds nothing open)
        """Release what the reader holds open."""


class TooLarge(OSError):
    """A file not read because it is larger than the limit asked (`read_many`); its size in `size`."""

    def __init__(self, path: object, size: int):
        super().__init__(errno.EFBIG, f"{size} bytes, more than asked for", str(path))
        self.size = size


class Location(ABC):
    """The storage-specific operations on a path of one kind."""

    has_flock = True  # False: files here can never hold a POSIX advisory lock (flock)
    described = "on a filesystem"  # where a path of this kind is, for messages ("... is on X")

    @abstractmethod
    def write_whole(self, path: Any, data: bytes) -> None:
        """Replace `path` with `data` so that a reader sees the old object or the new one whole."""

    @abstractmethod
    def write_streamed(self, path: Any, fill: Callable[[BinaryIO], None]) -> None:
        """Write `path` from `fill(file)` (a tar, say) so that no reader sees it before it is
        complete; an error in `fill` leaves no new file behind."""

    @abstractmethod
    def create_exclusive(self, path: Any, data: bytes) -> bool:
        """Create `path` holding `data` only if it does not exist; True when this call created it
        (or a retry of it did: an existing object with exactly `data` counts as ours), else False."""

    @abstractmethod
    def staged(self, folder: Any) -> AbstractContextManager[Any]:
        """A local folder standing for `folder` while a block writes files into it with ordinary
        file APIs (plots, CSVs): `folder` itself on a filesystem; on object storage a temporary
        folder whose files are uploaded to `folder` when the block ends without an error."""

    @abstractmethod
    def open_reader(self, path: Any) -> RangeReader:
        """`path` opened for reads by byte range (FileNotFoundError when it is missing)."""

    @abstractmethod
    def read_range(self, path: Any, offset: int, size: int) -> bytes:
        """`size` bytes of `path` from `offset`."""

    @abstractmethod
    def size(self, path: Any) -> int:
        """The size of the file in bytes (FileNotFoundError when it is missing)."""

    @abstractmethod
    def mtime(self, path: Any) -> float:
        """When the file was last written, in seconds since the epoch."""

    @abstractmethod
    def walk_files(self, folder: Any) -> list[tuple[Any, int]]:
        """Every file below `folder` (at any depth) with its size in bytes, sorted by its path as
        text (an object store's key order); [] when `folder` does not exist. The one listing of a
        folder for every input source. Symlinked folders are not followed but listed, with the
        link's own size (reading one says it is a folder); a symlink to a file is listed with the
        size of its target, one that cannot be followed (dangling, a loop) with its own size."""

    @abstractmethod
    def exists(self, path: Any) -> bool:
        """Whether anything is at `path`: a file, a folder (a prefix with objects below it), a
        symlink even when it cannot be followed (reading it says why)."""

    @abstractmethod
    def absolute(self, path: Any) -> Any:
        """`path` as a run records it: a local path made absolute (`..` resolved lexically, symlinks
        kept), a URL as it is."""

    def address(self, path: Any) -> str:
        """`absolute(path)` as text: the address an input or an image is recorded by."""
        return str(self.absolute(path))

    @abstractmethod
    def relative(self, folder: Any, text: str) -> str | None:
        """`text`, an absolute path of this kind (a URL on object storage), relative to `folder` as
        a posix path (starting with `..` when outside it); None when `text` is not one (a relative
        path or pattern, to be taken relative to `folder` by the caller)."""

    @abstractmethod
    def read_many(self, paths: list[str], limit: int | None = None) -> dict[str, bytes | OSError]:
        """The whole bytes of each path (as text), or the error reading it gave: on a filesystem
        read one by one, a file over `limit` bytes never read (`TooLarge`), a folder
        IsADirectoryError; on object storage fetched concurrently (one GET each), one over `limit`
        TooLarge once fetched."""

    @abstractmethod
    def remove_tree(self, folder: Any) -> None:
        """Delete `folder` and everything below it (nothing there: nothing done)."""

    @abstractmethod
    def remove_empty_folder(self, folder: Any) -> None:
        """Remove `folder` when nothing is below it: an empty folder on a filesystem; nothing on
        object storage, where a prefix without objects does not exist."""

    @abstractmethod
    def write_marker(self, path: Any, data: bytes) -> bool:
        """Publish a marker saying that work is complete (a done marker): True when `path` now
        holds `data`; False when another writer's marker was there first and is kept (the caller
        compares it with its own). A filesystem replaces the file atomically (always True: a
        second writer's marker holds the same facts); object storage creates it once, by a
        conditional PUT."""

    @abstractmethod
    def lock(self, path: Any) -> AbstractContextManager[None]:
        """An exclusive lock named `path`, held while the block runs: `flock` on a filesystem (the
        kernel drops it when its process dies), a `creation_lock` on object storage."""

    @contextmanager
    def creation_lock(self, path: Any, stale_s: float = LOCK_STALE_S) -> Iterator[None]:
        """An exclusive lock that needs only exclusive creation: the file `path`, created with
        `create_exclusive` (a conditional PUT on object storage) and deleted at the end. A lock
        left by a dead holder (older than `stale_s`) is removed by the one waiter that creates its
        takeover marker first; so is one whose holder, a process on this host, is gone."""
        token = json.dumps({"owner": uuid.uuid4().hex, **holder_fields(), "since": time.time()}).encode()
        while not self.create_exclusive(path, token):
            try:
                held = path.read_bytes()
                rec = json.loads(held)
            except FileNotFoundError:
                continue  # released meanwhile
            except ValueError:
                held, rec = b"", {}
            if time.time() - rec.get("since", 0) > stale_s or holder_gone(rec):
                marker = path.with_name(f"{path.name}.takeover-{hashlib.sha256(held).hexdigest()[:16]}")
                if self.create_exclusive(marker, token):
                    path.unlink(missing_ok=True)
                    marker.unlink(missing_ok=True)
            time.sleep(0.2)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    @abstractmethod
    def zarr_store(self, path: Any) -> Any:
        """What zarr-python opens for the Zarr store at `path` (`zarr.open_group(store, ...)`)."""

    @abstractmethod
    def sync_tree(self, path: Any) -> None:
        """Make a file, or every file and folder under `path`, written by a library with ordinary
        writes (zarr-python's chunk files), durable: fsync on a filesystem; nothing on object
        storage, where a PUT that returned is durable."""

    @abstractmethod
    def remove_stale(self, folder: Any, patterns: list[str]) -> None:
        """Delete the files under `folder` matching the glob `patterns` that a killed writer left
        (temporaries it would have renamed; the caller holds the claim on what they belong to).
        Object storage has none (every object is written by one PUT): nothing is done there."""

    @abstractmethod
    def file_for_ranged_reads(self, path: Any) -> Any:
        """What to hand a library that opens a file itself and reads parts of it (pyarrow's
        `ParquetFile`): the local path as text (the library opens it its own way), or a seekable
        file object whose reads are ranged GETs."""

    @abstractmethod
    def file_for_whole_read(self, path: Any) -> Any:
        """What to hand a library that reads a whole file (`torch.load`): the local path, or the
        object's bytes read in one GET, as a seekable in-memory file."""
