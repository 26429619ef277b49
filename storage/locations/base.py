"""What a storage location must do beyond reading and writing whole files: the interface that the
local disk (`local.py`) and object storage through fsspec (`object_store.py`) implement.

A path of either kind offers the pathlib subset the stages use (`/`, `name`, `parent`, `exists`,
`read_bytes`, `write_bytes`, `iterdir`, `glob`, `unlink`, `stat`, `open`); the operations here are
the ones whose meaning differs between a POSIX filesystem and an object store."""

from __future__ import annotations

import contextvars
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, BinaryIO

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


class Location(ABC):
    """The storage-specific operations on a path of one kind."""

    remote = False  # True: no POSIX file descriptors, no rename, no flock

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
