"""The shard work queue: which shards are pending, and a claim per shard so that several
extract processes on one run never work on the same shard.

A claim is an exclusive `flock` on `claims/<shard>.lock`, holding the owner's host and pid for
`status`. The kernel drops the lock when its process dies (even by SIGKILL), so a dead worker's
shard is free again at once; a half-written shard without a done marker is simply redone.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class Claim:
    """This process's hold on one shard; released explicitly (or by the kernel when it dies)."""

    def __init__(self, shard_id: int, fd: int):
        self.shard_id, self._fd = shard_id, fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ShardQueue:
    """Hands out pending shards, each to one process at a time."""

    def __init__(self, claims_dir: Path, num_shards: int, is_done: Callable[[int], bool]):
        self.claims_dir = Path(claims_dir)
        self.num_shards = num_shards
        self.is_done = is_done

    def lock_path(self, shard_id: int) -> Path:
        return self.claims_dir / f"{shard_id:05d}.lock"

    def pending(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.is_done(s)]

    def claim(self, shard_id: int) -> Claim | None:
        """The shard's claim, or None when another process holds it."""
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path(shard_id), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        return Claim(shard_id, fd)

    @contextmanager
    def try_claim(self, shard_id: int) -> Iterator[bool]:
        """Yield True while this process holds the shard's claim, False if another process does."""
        claim = self.claim(shard_id)
        try:
            yield claim is not None
        finally:
            if claim is not None:
                claim.release()

    def holder(self, shard_id: int) -> str | None:
        """`host pid` of the process working on the shard now, or None when nobody is."""
        path = self.lock_path(shard_id)
        if not path.exists():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return path.read_text().strip() or "unknown"
        finally:
            os.close(fd)
